"""The Anthropic Messages API: POST /v1/messages (streaming or not) and /v1/messages/count_tokens.

Content blocks map onto the Qwen3.5 template: ``thinking`` blocks are the assistant's reasoning,
``tool_use`` blocks its tool calls, ``tool_result`` blocks become tool messages. The answer comes back
as thinking / text / tool_use blocks; ``usage.cache_read_input_tokens`` counts the prompt tokens a prefix
snapshot saved from prefill (``input_tokens`` the ones prefilled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from streamer.generation.constrained import tool_call_grammar
from streamer.serve.api import (
    ApiContext,
    ApiError,
    EventStream,
    Fields,
    Heartbeat,
    JsonResponse,
    Prompt,
    answer_events,
    completion_budget,
    make_constraint,
    make_id,
    make_job,
    render_chat,
    run_job,
)
from streamer.serve.tool_calls import OutputParser, ToolCall
from streamer.serve.worker import Finished

_ERROR_TYPES = {"server_error": "api_error"}


def error_body(e: ApiError) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(e.kind, e.kind), "message": e.message}}


def count_tokens(body, ctx: ApiContext) -> JsonResponse:
    """Handles POST /v1/messages/count_tokens."""
    prompt, _, _ = _prompt(Fields(body), ctx)
    return JsonResponse({"input_tokens": len(prompt.ids)})


def messages(body, ctx: ApiContext) -> JsonResponse | EventStream | None:
    """Handles POST /v1/messages; None when the client went away before the answer."""
    f = Fields(body)
    model = ctx.settings.check_model(body.get("model"))
    max_tokens = f.number("max_tokens", 1, integer=True)
    if max_tokens is None:
        raise ApiError(400, "max_tokens is required", param="max_tokens")
    prompt, tools, forced = _prompt(f, ctx)
    grammar = None
    if forced is not None:
        parallel = not forced.disable_parallel
        grammar = lambda: tool_call_grammar(tools, forced.names, parallel)  # noqa: E731
    constraint = make_constraint(ctx, grammar, prompt.thinking, "tool_choice", f.flag("ignore_eos"))
    mid = make_id("msg_")
    job = make_job(
        ctx,
        f,
        prompt.ids,
        completion_budget(
            ctx.settings, len(prompt.ids), max_tokens, "max_tokens", "messages", anthropic=True
        ),
        thinking=prompt.thinking,
        stop_param="stop_sequences",
        snapshot_at=() if prompt.boundary is None else (prompt.boundary,),
        label=mid,
        constraint=constraint,
    )
    events = answer_events(run_job(ctx, job), OutputParser(prompt.thinking, tools), ctx.memory)
    head = {"id": mid, "type": "message", "role": "assistant", "model": model}
    if f.flag("stream"):
        return EventStream(_stream(head, events, len(prompt.ids)))
    return _answer(head, events)


def _prompt(f: Fields, ctx: ApiContext) -> tuple[Prompt, list[dict] | None, _Forced | None]:
    ctx.settings.check_model(f.body.get("model"))
    history = []
    system = f.get("system", (str, list))
    if system:
        history.append({"role": "system", "content": _text(system, "system")})
    for i, m in enumerate(f.get("messages", list, required=True)):
        history += _template_messages(m, f"messages[{i}]")
    if not history:
        raise ApiError(400, "messages must not be empty", param="messages")
    tools = _tools(f.get("tools", list))
    kind, forced = _tool_choice(f, tools)
    if kind == "none":
        tools = None
    ctx.memory.fill(history)
    return render_chat(ctx.tokenizer, history, tools, _thinking(f, ctx.settings.thinking)), tools, forced


@dataclass
class _Forced:
    """A tool_choice that forces a call: the tools it may name, and whether only one call may come."""

    names: list[str]
    disable_parallel: bool


def _tool_choice(f: Fields, tools: list[dict] | None) -> tuple[str, _Forced | None]:
    """The request's tool_choice type, checked, and for 'any' / 'tool' the call it forces."""
    choice = Fields(f.get("tool_choice", dict, {"type": "auto"}), "tool_choice")
    kind = choice.get("type", str, required=True)
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(
            400,
            f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', got {kind!r}",
            param="tool_choice",
        )
    disable_parallel = choice.get("disable_parallel_tool_use", bool, False)
    names = [t["function"]["name"] for t in tools or []]
    if kind == "tool":
        name = choice.get("name", str)
        if name is None or name not in names:
            raise ApiError(
                400,
                f"tool_choice {{'type': 'tool'}} needs the name of one of the tools "
                f"({', '.join(map(repr, names)) or 'none given'}), got {name!r}",
                param="tool_choice",
            )
        return kind, _Forced([name], disable_parallel)
    if kind == "any":
        if not names:
            raise ApiError(
                400, "tool_choice {'type': 'any'} needs at least one tool in tools", param="tool_choice"
            )
        return kind, _Forced(names, disable_parallel)
    return kind, None


def _answer(head: dict, events) -> JsonResponse | None:
    content, finished = [], None
    for event in events:
        if isinstance(event, Finished):
            finished = event
        elif isinstance(event, Heartbeat):
            continue
        elif event.kind == "tool_call":
            content.append(_tool_use(event.call))
        else:
            kind, key = ("thinking", "thinking") if event.kind == "reasoning" else ("text", "text")
            if content and content[-1]["type"] == kind:
                content[-1][key] += event.text
            else:
                content.append(
                    {"type": kind, key: event.text, **({"signature": ""} if kind == "thinking" else {})}
                )
    if finished is None:
        return None
    stop_reason = _stop_reason(finished, any(b["type"] == "tool_use" for b in content))
    return JsonResponse(
        {
            **head,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": finished.stop_sequence,
            "usage": _usage(finished),
        }
    )


def _stream(head: dict, events, prompt_tokens: int):
    start_usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
    message = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    yield _event("message_start", message=message)
    yield _event("ping")
    blocks = _Blocks()
    try:
        for delta in events:
            if isinstance(delta, Heartbeat):
                yield _event("ping")
            elif isinstance(delta, Finished):
                yield from blocks.close()
                stop = {
                    "stop_reason": _stop_reason(delta, blocks.used_tools),
                    "stop_sequence": delta.stop_sequence,
                }
                yield _event("message_delta", delta=stop, usage=_usage(delta))
                yield _event("message_stop")
            else:
                yield from blocks.add(delta)
    except ApiError as e:
        yield "error", json.dumps(error_body(e))


def _event(name: str, **data) -> tuple[str, str]:
    return name, json.dumps({"type": name, **data})


class _Blocks:
    """Answer deltas as content-block events: a block per run of one kind, and one per tool call."""

    def __init__(self):
        self.index, self.open, self.used_tools = -1, None, False

    def add(self, delta):
        kind = {"reasoning": "thinking", "content": "text", "tool_call": "tool_use"}[delta.kind]
        if kind != self.open or kind == "tool_use":
            yield from self.close()
            self.index, self.open = self.index + 1, kind
            if kind == "tool_use":
                self.used_tools = True
                block = {**_tool_use(delta.call), "input": {}}
            else:
                block = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
            yield _event("content_block_start", index=self.index, content_block=block)
        if kind == "tool_use":
            partial = json.dumps(delta.call.arguments, ensure_ascii=False)
            change = {"type": "input_json_delta", "partial_json": partial}
        else:
            change = {"type": f"{kind}_delta", kind: delta.text}
        yield _event("content_block_delta", index=self.index, delta=change)

    def close(self):
        if self.open == "thinking":  # clients expect a signature; this server has none to give
            yield _event(
                "content_block_delta", index=self.index, delta={"type": "signature_delta", "signature": ""}
            )
        if self.open:
            yield _event("content_block_stop", index=self.index)
        self.open = None


def _usage(finished: Finished) -> dict:
    u = finished.usage
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _stop_reason(finished: Finished, used_tools: bool) -> str:
    if used_tools:
        return "tool_use"
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if finished.reason == "length" else "end_turn"


def _tool_use(call: ToolCall) -> dict:
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": call.arguments,
    }


def _thinking(f: Fields, default: bool) -> bool:
    config = f.get("thinking", dict)
    if config is None:
        return default
    kind = config.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise ApiError(400, "thinking.type must be 'enabled', 'adaptive' or 'disabled'", param="thinking")
    return kind != "disabled"


def _template_messages(m, where: str) -> list[dict]:
    """One Anthropic message as template messages: tool results become ``tool`` messages.

    A ``system`` role is not Anthropic's (it has the top-level ``system``), but clients translating
    OpenAI conversations send it: it joins the system prompt (``render_chat`` merges them in order).
    """
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
        raise ApiError(400, f"{where} must be an object with role 'user' or 'assistant'", param=where)
    if m["role"] == "system":
        return [{"role": "system", "content": _text(m.get("content"), f"{where}.content")}]
    blocks = m.get("content")
    if isinstance(blocks, str):
        blocks = [{"type": "text", "text": blocks}]
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where}.content must be a string or an array of content blocks", param=where)
    if m["role"] == "assistant":
        return [_assistant(blocks, where)]
    out, texts = [], []
    for j, block in enumerate(blocks):
        kind = _block_type(block, f"{where}.content[{j}]")
        if kind == "tool_result":
            text = _text(block.get("content") or "", f"{where}.content[{j}].content")
            out.append({"role": "tool", "content": ("Error: " + text) if block.get("is_error") else text})
        elif kind == "text":
            texts.append(_text([block], where))
        else:
            raise ApiError(400, f"{where}: content block {kind!r} is not supported here", param=where)
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(blocks: list, where: str) -> dict:
    texts, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        kind = _block_type(block, f"{where}.content[{j}]")
        if kind == "text":
            texts.append(_text([block], where))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise ApiError(
                    400, f"{where}.content[{j}]: tool_use needs a name and an input object", param=where
                )
            fn = {"name": block["name"], "arguments": block.get("input") or {}}
            calls.append({"id": block.get("id"), "type": "function", "function": fn})
        elif kind != "redacted_thinking":
            raise ApiError(400, f"{where}: content block {kind!r} is not supported here", param=where)
    out = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        out["reasoning_content"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _block_type(block, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ApiError(400, f"{where} must be a content block object with a type", param=where)
    return block["type"]


def _text(content, where: str) -> str:
    """Text of a string or a list of text blocks (images and documents are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or an array of text blocks", param=where)
    texts = []
    for block in content:
        if _block_type(block, where) != "text" or not isinstance(block.get("text"), str):
            raise ApiError(
                400, f"{where}: only text blocks are supported, got {block.get('type')!r}", param=where
            )
        texts.append(block["text"])
    return "\n".join(texts)


def _tools(tools: list | None) -> list[dict] | None:
    """Anthropic tools in the OpenAI function form the Qwen3.5 template was trained on."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ApiError(400, f"tools[{i}] must be an object with a name", param="tools")
        if "input_schema" not in tool:
            continue  # a server tool (web search, ...): nothing this server can run
        fn = {
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool["input_schema"],
        }
        out.append({"type": "function", "function": fn})
    return out or None
