"""The OpenAI API: /v1/chat/completions, /v1/completions and /v1/models, streaming or not.

Reasoning comes back as ``reasoning_content`` (message and deltas), Qwen3.5 tool calls as
``tool_calls`` with JSON-string arguments, and ``usage.prompt_tokens_details.cached_tokens`` counts the
prompt tokens a prefix snapshot saved from prefill. ``logprobs`` / ``top_logprobs`` (chat; ``logprobs: k`` on
completions) report every generated token's log-softmax under the model, before temperature, penalties and
filters (vLLM's default), reasoning and tool-call tokens included. Extensions: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos`` and ``chat_template_kwargs.enable_thinking``.
"""

from __future__ import annotations

import json
import time

from streamer.generation.constrained import json_grammar, tool_call_grammar
from streamer.serve.api import (
    Answered,
    AnswerStream,
    ApiContext,
    ApiError,
    EventStream,
    Fields,
    Heartbeat,
    JsonResponse,
    Logprobs,
    choice_events,
    choice_jobs,
    completion_budget,
    make_constraint,
    make_id,
    make_job,
    render_chat,
    run_jobs,
    think_close_id,
)
from streamer.serve.tool_calls import OutputParser
from streamer.serve.worker import Finished, TokenLogprob
from streamer.storage.packed_format import pruned_label

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def error_body(e: ApiError) -> dict:
    code = e.code or ("model_not_found" if e.kind == "not_found_error" and e.param == "model" else None)
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": code}}


def list_models(ctx: ApiContext, created: int) -> JsonResponse:
    names = ctx.settings.model_names
    data = [{"id": n, "object": "model", "created": created, "owned_by": "streamer"} for n in names]
    pruned = _pruned(ctx)
    if pruned:  # a model written by `streamer prune` says so (extension field)
        data = [{**d, "pruned": pruned} for d in data]
    return JsonResponse({"object": "list", "data": data})


def _pruned(ctx: ApiContext) -> dict | None:
    runtime = getattr(getattr(ctx.worker, "engine", None), "runtime", None)
    manifest = runtime.packed.manifest if runtime is not None else None
    if manifest is None or manifest.pruned is None:
        return None
    p = manifest.pruned
    keys = ("method", "experts", "source_experts")
    return {"label": pruned_label(manifest), **{k: p.get(k) for k in keys}, "source": p["source"].get("name")}


def chat_completions(body, ctx: ApiContext) -> JsonResponse | EventStream | None:
    """Handles POST /v1/chat/completions; None when the client went away before the answer."""
    f = Fields(body)
    model = ctx.settings.check_model(body.get("model"))
    n = _choices(f, ctx)
    logprobs = _chat_logprobs(f)
    messages = [_template_message(m, i) for i, m in enumerate(f.get("messages", list, required=True))]
    if not messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    tools = _tools(f.get("tools", list))
    choice, forced = _tool_choice(f, tools)
    if choice == "none":
        tools = None
    grammar, grammar_param = response_format_grammar(f.get("response_format", dict, {})), "response_format"
    if forced:
        parallel = f.flag("parallel_tool_calls", True)
        grammar, grammar_param = (lambda: tool_call_grammar(tools, forced, parallel)), "tool_choice"
    thinking = _thinking(f, ctx.settings.thinking)
    ctx.memory.fill(messages)
    prompt = render_chat(ctx.tokenizer, messages, tools, thinking)
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    budget = completion_budget(
        ctx.settings, len(prompt.ids), f.number(param, 1, integer=True), param, "messages"
    )
    include_usage = _include_usage(f)
    cid = make_id("chatcmpl-")
    snapshot_at = () if prompt.boundary is None else (prompt.boundary,)

    def constraint():
        return make_constraint(ctx, grammar, prompt.thinking, grammar_param, f.flag("ignore_eos"))

    job = make_job(
        ctx,
        f,
        prompt.ids,
        budget,
        thinking=prompt.thinking,
        stop_param="stop",
        snapshot_at=snapshot_at,
        label=cid,
        logprobs=logprobs,
        constraint=constraint(),
    )
    jobs = choice_jobs(job, n, constraint)
    think_close = think_close_id(ctx, prompt.thinking)
    streams = [AnswerStream(OutputParser(prompt.thinking, tools), ctx.memory, think_close) for _ in jobs]
    events = choice_events(run_jobs(ctx, jobs), streams)
    head = {"id": cid, "created": int(time.time()), "model": model}
    if f.flag("stream"):
        return EventStream(_chat_stream(head, events, n, include_usage, logprobs is not None))
    return _chat_answer(head, events, n, logprobs is not None)


def _chat_answer(head: dict, events, n: int, want_logprobs: bool) -> JsonResponse | None:
    parts = [{"reasoning": [], "content": [], "tool_call": []} for _ in range(n)]
    finished: list[Answered | None] = [None] * n
    tokens: list[list[TokenLogprob]] = [[] for _ in range(n)]
    for i, event in events:
        if isinstance(event, Finished):
            finished[i] = event
        elif isinstance(event, Logprobs):
            tokens[i] += event.tokens
        elif not isinstance(event, Heartbeat):
            parts[i][event.kind].append(event.call if event.kind == "tool_call" else event.text)
    if None in finished:
        return None
    choices = []
    for i, (p, done) in enumerate(zip(parts, finished, strict=True)):
        calls = p["tool_call"]
        message = {"role": "assistant", "content": "".join(p["content"]) or (None if calls else "")}
        if p["reasoning"]:
            message["reasoning_content"] = "".join(p["reasoning"])
        if calls:
            message["tool_calls"] = [_tool_call_json(c) for c in calls]
        logprobs = _chat_logprobs_json(tokens[i]) if want_logprobs else None
        choices.append(
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": _finish(done, calls)}
        )
    body = {**head, "object": "chat.completion", "choices": choices, "usage": usage_json(finished)}
    return JsonResponse(body)


class _ChatChoiceStream:
    """What one choice of a streamed chat answer has sent: its role opening, tool calls, logprobs."""

    def __init__(self, index: int, head: dict, want_logprobs: bool):
        self.index, self.head, self.want_logprobs = index, head, want_logprobs
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not gone out yet
        self.started = False
        self.n_calls = 0

    def chunk(self, delta: dict, finish_reason=None, with_logprobs: bool = True) -> tuple[None, str]:
        logprobs = None
        if self.want_logprobs and self.pending and with_logprobs:
            logprobs = _chat_logprobs_json(self.pending)
            self.pending.clear()
        choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return None, json.dumps({**self.head, "object": "chat.completion.chunk", "choices": [choice]})

    def events(self, event) -> list[tuple[None, str]]:
        """The chunks for one answer event of this choice."""
        # The role goes out with the first event, as OpenAI does: a tool-call answer's first delta
        # carries the call and content null; any other answer starts with content "".
        first, out = not self.started, []
        if isinstance(event, Logprobs):
            self.pending.extend(event.tokens)
            return out
        self.started = True
        tool_call = not isinstance(event, Finished) and event.kind == "tool_call"
        if first and not tool_call:
            out.append(self.chunk({"role": "assistant", "content": ""}, with_logprobs=False))
        if isinstance(event, Finished):
            out.append(self.chunk({}, _finish(event, self.n_calls)))
        elif tool_call:
            delta = {"tool_calls": [{"index": self.n_calls, **_tool_call_json(event.call)}]}
            out.append(self.chunk({"role": "assistant", "content": None, **delta} if first else delta))
            self.n_calls += 1
        else:
            out.append(
                self.chunk({"reasoning_content" if event.kind == "reasoning" else "content": event.text})
            )
        return out


def _chat_stream(head: dict, events, n: int, include_usage: bool, want_logprobs: bool = False):
    choices = [_ChatChoiceStream(i, head, want_logprobs) for i in range(n)]
    finished: list[Answered | None] = [None] * n
    try:
        for i, event in events:
            if isinstance(event, Heartbeat):
                yield None, None
                continue
            if isinstance(event, Finished):
                finished[i] = event
            yield from choices[i].events(event)
        if include_usage and None not in finished:
            body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_json(finished)}
            yield None, json.dumps(body)
    except ApiError as e:
        yield None, json.dumps(error_body(e))
    yield None, "[DONE]"


def completions(body, ctx: ApiContext) -> JsonResponse | EventStream | None:
    """Handles POST /v1/completions: a raw prompt (text or token ids) continued as is."""
    f = Fields(body)
    model = ctx.settings.check_model(body.get("model"))
    if f.flag("echo"):
        raise ApiError(400, "echo is not supported", param="echo")
    n = _choices(f, ctx)
    logprobs = f.number("logprobs", 0, 20, integer=True)
    ids = _prompt_ids(f.get("prompt", (str, list), required=True), ctx.tokenizer)
    max_tokens = f.number("max_tokens", 1, integer=True)
    budget = completion_budget(ctx.settings, len(ids), max_tokens, "max_tokens", "prompt")
    include_usage = _include_usage(f)
    cid = make_id("cmpl-")
    # A snapshot before the last token lets the same prompt, sent again, skip all but one token.
    job = make_job(
        ctx,
        f,
        ids,
        budget,
        thinking=False,
        stop_param="stop",
        snapshot_at=(len(ids) - 1,),
        label=cid,
        logprobs=logprobs,
    )
    jobs = choice_jobs(job, n)
    events = choice_events(run_jobs(ctx, jobs), [AnswerStream(None) for _ in jobs])
    head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model}
    if f.flag("stream"):
        return EventStream(_completion_stream(head, events, n, include_usage, logprobs is not None))
    texts: list[list[str]] = [[] for _ in range(n)]
    finished: list[Answered | None] = [None] * n
    tokens: list[list[TokenLogprob]] = [[] for _ in range(n)]
    for i, event in events:
        if isinstance(event, Finished):
            finished[i] = event
        elif isinstance(event, Logprobs):
            tokens[i] += event.tokens
        elif not isinstance(event, Heartbeat):
            texts[i].append(event.text)
    if None in finished:
        return None
    choices = []
    for i, done in enumerate(finished):
        lp = _completion_logprobs_json(tokens[i], 0) if logprobs is not None else None
        text = "".join(texts[i])
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": _finish(done, [])})
    return JsonResponse({**head, "choices": choices, "usage": usage_json(finished)})


def _completion_stream(head: dict, events, n: int, include_usage: bool, want_logprobs: bool = False):
    pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
    offsets = [0] * n  # where each choice's next token starts in its completion text
    finished: list[Answered | None] = [None] * n

    def chunk(i: int, text: str, finish_reason=None) -> tuple[None, str]:
        logprobs = None
        if want_logprobs and pending[i]:
            logprobs = _completion_logprobs_json(pending[i], offsets[i])
            offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            pending[i].clear()
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return None, json.dumps({**head, "choices": [choice]})

    try:
        for i, event in events:
            if isinstance(event, Heartbeat):
                yield None, None
            elif isinstance(event, Logprobs):
                pending[i].extend(event.tokens)
            elif isinstance(event, Finished):
                finished[i] = event
                yield chunk(i, "", _finish(event, []))
            else:
                yield chunk(i, event.text)
        if include_usage and None not in finished:
            yield None, json.dumps({**head, "choices": [], "usage": usage_json(finished)})
    except ApiError as e:
        yield None, json.dumps(error_body(e))
    yield None, "[DONE]"


def _chat_logprobs(f: Fields) -> int | None:
    """None without ``logprobs: true``; else how many alternatives each token lists (top_logprobs)."""
    wanted = f.flag("logprobs")
    top = f.number("top_logprobs", 0, 20, integer=True)
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _token_text(token: bytes) -> str:
    # A byte-level token may hold part of a character: its bytes say which (as OpenAI writes them).
    return token.decode("utf-8", errors="backslashreplace")


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -Infinity; OpenAI writes this floor too


def _chat_logprobs_json(tokens: list[TokenLogprob]) -> dict:
    def entry(token: bytes, logprob: float) -> dict:
        return {"token": _token_text(token), "logprob": _finite(logprob), "bytes": list(token)}

    content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(*p) for p in t.top]} for t in tokens]
    return {"content": content, "refusal": None}


def _completion_logprobs_json(tokens: list[TokenLogprob], offset: int) -> dict:
    texts = [_token_text(t.token) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [_finite(t.logprob) for t in tokens],
        "top_logprobs": [{_token_text(tok): _finite(lp) for tok, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def usage_json(finished: list[Answered]) -> dict:
    """Usage of a response's choices: the prompt counted once, the completions of every choice summed."""
    u = finished[0].usage
    completion = sum(done.usage.completion_tokens for done in finished)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": sum(done.reasoning_tokens for done in finished)},
    }


def _finish(finished: Finished, calls) -> str:
    if calls:
        return "tool_calls"
    return "length" if finished.reason == "length" else "stop"


def _tool_call_json(call) -> dict:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _choices(f: Fields, ctx: ApiContext) -> int:
    """The request's ``n``: how many choices, each one sequence of the batch (at most --max-batch)."""
    n = f.number("n", 1, integer=True) or 1
    cap = ctx.worker.batch.max_batch
    if n > cap:
        raise ApiError(
            400,
            f"n must be at most {cap}, got {n}: this server decodes at most {cap} sequences together "
            "(streamer serve --max-batch); lower n or send several requests",
            param="n",
        )
    return n


def _tool_choice(f: Fields, tools: list[dict] | None) -> tuple[str, list[str] | None]:
    """The request's tool_choice, checked: ('none' | 'auto', None), or ('required', the functions the
    forced call may name): 'required' allows any of the tools, a named function only that one."""
    choice = f.get("tool_choice", (str, dict), "auto")
    if choice in ("none", "auto"):
        return choice, None
    names = [t["function"]["name"] for t in tools or []]
    if choice == "required":
        if not names:
            raise ApiError(
                400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice"
            )
        return "required", names
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': NAME}}",
            param="tool_choice",
        )
    if fn["name"] not in names:
        raise ApiError(
            400,
            f"tool_choice names function {fn['name']!r}, which is not among the tools "
            f"({', '.join(map(repr, names)) or 'none given'})",
            param="tool_choice",
        )
    return "required", [fn["name"]]


def response_format_grammar(value: dict, where: str = "response_format", flat: bool = False):
    """The grammar writer for a response format (None for plain text); wrong values are 400s.

    Chat Completions nests the schema (``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}``); the Responses API's ``text.format`` is ``flat`` (``{"type": "json_schema", "name",
    "schema", "strict"}``). The schema is enforced whatever ``strict`` says.
    """
    fmt = Fields(value, where)
    kind = fmt.get("type", str, "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar
    if kind != "json_schema":
        raise ApiError(
            400, f"{where}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param=where
        )
    spec = fmt if flat else Fields(fmt.get("json_schema", dict, required=True), f"{where}.json_schema")
    spec.get("name", str)
    spec.get("strict", bool)
    schema = spec.get("schema", dict, {})
    return lambda: json_grammar(schema)


def _include_usage(f: Fields) -> bool:
    options = Fields(f.get("stream_options", dict, {}), "stream_options")
    return options.flag("include_usage")


def _thinking(f: Fields, default: bool) -> bool:
    kwargs = f.get("chat_template_kwargs", dict, {})
    value = kwargs.get("enable_thinking", default)
    if not isinstance(value, bool):
        raise ApiError(
            400, "chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs"
        )
    return value


def _template_message(m, i: int) -> dict:
    """One OpenAI message in the form the Qwen3.5 template reads (arguments as dicts, text content)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        raise ApiError(400, f"{where} must be an object with role one of {', '.join(ROLES)}", param=where)
    out = {"role": ROLES[m["role"]], "content": _text(m.get("content"), where)}
    if out["role"] == "assistant":
        if isinstance(reasoning := m.get("reasoning_content", m.get("reasoning")), str):
            out["reasoning_content"] = reasoning
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ApiError(400, f"{where}.tool_calls must be an array", param=where)
            out["tool_calls"] = [_template_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return out


def _template_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    arguments = fn.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ApiError(400, f"{where}.function.arguments is not valid JSON: {e}", param=where) from None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments must be a JSON object", param=where)
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": fn["name"], "arguments": arguments},
    }


def _text(content, where: str) -> str:
    """Message content as text: a string, null, or a list of text parts (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of parts", param=where)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{where}: content part {kind!r} is not supported (text only)", param=where)
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}: a text part needs a string 'text'", param=where)
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(tools: list | None) -> list[dict] | None:
    if not tools:
        return None
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(
                400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', ...}}}}", param="tools"
            )
    return tools


def _prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a batch of one", param="prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    return list(ids)
