"""The OpenAI Responses API: POST /v1/responses, streaming or not, on the same generation core.

``input`` is a string or a list of items: messages (``input_text`` / ``output_text`` parts),
``function_call`` and ``function_call_output`` items, and ``reasoning`` items (given back to the model as
its reasoning before the next answer). ``instructions`` is the system message. Tools are flat function
tools (``{"type": "function", "name", "parameters"}``); ``tool_choice`` ``required`` or a named function and
``text.format`` ``json_object`` / ``json_schema`` are enforced by constrained decoding. ``reasoning.effort``
``none`` / ``minimal`` turns thinking off, any other effort on; the model's reasoning comes back as a
``reasoning`` item (its text in ``content``, as ``reasoning_text``).

This server keeps no responses: ``store`` is answered ``false`` and ``previous_response_id`` is a 400 (send
the whole conversation in ``input``, as stateless clients do).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from streamer.generation.constrained import tool_call_grammar
from streamer.serve.api import (
    Answered,
    ApiContext,
    ApiError,
    EventStream,
    Fields,
    Heartbeat,
    JsonResponse,
    answer_events,
    completion_budget,
    make_constraint,
    make_id,
    make_job,
    render_chat,
    run_job,
    think_close_id,
)
from streamer.serve.openai_api import response_format_grammar
from streamer.serve.tool_calls import Delta, OutputParser
from streamer.serve.worker import Finished

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_THINKING_EFFORTS = {
    "none": False,
    "minimal": False,
    "low": True,
    "medium": True,
    "high": True,
    "xhigh": True,
}


def create(body, ctx: ApiContext) -> JsonResponse | EventStream | None:
    """Handles POST /v1/responses; None when the client went away before the answer."""
    f = Fields(body)
    model = ctx.settings.check_model(body.get("model"))
    if f.get("previous_response_id", str) is not None:
        raise ApiError(
            400,
            "previous_response_id is not supported: this server stores no responses; "
            "send the whole conversation in input",
            param="previous_response_id",
        )
    messages = _messages(f)
    tools = _tools(f.get("tools", list))
    choice, forced = _tool_choice(f, tools)
    if choice == "none":
        tools = None
    text = Fields(f.get("text", dict, {}), "text")
    grammar = response_format_grammar(text.get("format", dict, {}), "text.format", flat=True)
    grammar_param = "text.format"
    if forced:
        parallel = f.flag("parallel_tool_calls", True)
        grammar, grammar_param = (lambda: tool_call_grammar(tools, forced, parallel)), "tool_choice"
    thinking = _thinking(f, ctx.settings.thinking)
    ctx.memory.fill(messages)
    prompt = render_chat(ctx.tokenizer, messages, tools, thinking)
    requested = f.number("max_output_tokens", 1, integer=True)
    budget = completion_budget(ctx.settings, len(prompt.ids), requested, "max_output_tokens", "input")
    rid = make_id("resp_")
    constraint = make_constraint(ctx, grammar, prompt.thinking, grammar_param, f.flag("ignore_eos"))
    job = make_job(
        ctx,
        f,
        prompt.ids,
        budget,
        thinking=prompt.thinking,
        stop_param="stop",
        snapshot_at=() if prompt.boundary is None else (prompt.boundary,),
        label=rid,
        constraint=constraint,
    )
    parser, think_close = OutputParser(prompt.thinking, tools), think_close_id(ctx, prompt.thinking)
    events = answer_events(run_job(ctx, job), parser, ctx.memory, think_close)
    head = _head(rid, model, f, body, tools, requested, prompt.thinking)
    if f.flag("stream"):
        return EventStream(_stream(head, events))
    return _answer(head, events)


# ---- the request --------------------------------------------------------------------------------------


def _messages(f: Fields) -> list[dict]:
    """``instructions`` and ``input`` as template messages."""
    out = []
    if (instructions := f.get("instructions", str)) is not None:
        out.append({"role": "system", "content": instructions})
    items = f.get("input", (str, list), required=True)
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    reasoning = None  # a reasoning item's text, for the assistant turn after it
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object (a message or an item)", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            _add_call(out, _function_call(item, where))
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": _output_text(item, where)})
        elif kind == "reasoning":
            reasoning = _reasoning_text(item)
            continue
        else:
            raise ApiError(
                400,
                f"{where}: item type {kind!r} is not supported (message, function_call, "
                "function_call_output and reasoning are)",
                param="input",
            )
        if reasoning is not None and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"] = reasoning
        reasoning = None
    if not any(m["role"] != "system" for m in out):
        raise ApiError(400, "input must hold at least one message", param="input")
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", param="input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": _ROLES[role], "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"{where}.content[{j}]: part {kind!r} is not supported (input_text / output_text with text)",
                param="input",
            )
        texts.append(part["text"])
    return {"role": _ROLES[role], "content": "\n".join(texts)}


def _function_call(item: dict, where: str) -> dict:
    name, arguments = item.get("name"), item.get("arguments", "")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise ApiError(
            400, f"{where}: a function_call needs a name and arguments (a JSON string)", param="input"
        )
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ApiError(400, f"{where}.arguments is not valid JSON: {e}", param="input") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"{where}.arguments must be a JSON object", param="input")
    call_id = item.get("call_id") or item.get("id")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


def _add_call(messages: list[dict], call: dict) -> None:
    """Calls in a row belong to one assistant turn (the one just before them, if it is the assistant's)."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": ""}
        messages.append(last)
    last.setdefault("tool_calls", []).append(call)


def _output_text(item: dict, where: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        parts = [p.get("text") for p in output if isinstance(p, dict)]
        if all(isinstance(t, str) for t in parts) and len(parts) == len(output):
            return "\n".join(parts)
    raise ApiError(400, f"{where}.output must be a string or an array of text parts", param="input")


def _reasoning_text(item: dict) -> str:
    parts = [*(item.get("content") or []), *(item.get("summary") or [])]
    return "\n".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def _tools(tools: list | None) -> list[dict] | None:
    """Flat function tools in the nested form the chat template reads."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise ApiError(
                400, f"tools[{i}]: tool type {kind!r} is not supported (function tools only)", param="tools"
            )
        if not isinstance(tool.get("name"), str):
            raise ApiError(400, f"tools[{i}] needs a name", param="tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(f: Fields, tools: list[dict] | None) -> tuple[str, list[str] | None]:
    """('none' | 'auto', None) or ('required', the functions the forced call may name)."""
    choice = f.get("tool_choice", (str, dict), "auto")
    names = [t["function"]["name"] for t in tools or []]
    if choice in ("none", "auto"):
        return choice, None
    if choice == "required":
        if not names:
            raise ApiError(
                400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice"
            )
        return "required", names
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(choice.get("name"), str)
    ):
        raise ApiError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': NAME}",
            param="tool_choice",
        )
    if choice["name"] not in names:
        raise ApiError(
            400,
            f"tool_choice names function {choice['name']!r}, which is not among the tools "
            f"({', '.join(map(repr, names)) or 'none given'})",
            param="tool_choice",
        )
    return "required", [choice["name"]]


def _thinking(f: Fields, default: bool) -> bool:
    effort = Fields(f.get("reasoning", dict, {}), "reasoning").get("effort", str)
    if effort is None:
        return default
    if effort not in _THINKING_EFFORTS:
        raise ApiError(
            400,
            f"reasoning.effort must be one of {', '.join(_THINKING_EFFORTS)}, got {effort!r}",
            param="reasoning",
        )
    return _THINKING_EFFORTS[effort]


def _head(rid: str, model: str, f: Fields, body: dict, tools, max_output_tokens, thinking: bool) -> dict:
    """The response object's fields that do not depend on the answer."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "instructions": body.get("instructions"),
        "max_output_tokens": max_output_tokens,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "parallel_tool_calls": f.flag("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None if thinking else "none", "summary": None},
        "store": False,
        "temperature": body.get("temperature"),
        "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "error": None,
        "incomplete_details": None,
    }


# ---- the answer ---------------------------------------------------------------------------------------


@dataclass
class _Output:
    """The output items as the deltas build them (reasoning, message, function calls)."""

    items: list[dict] = field(default_factory=list)

    def add(self, delta: Delta) -> tuple[dict, bool]:
        """Adds a delta; returns its item and whether the item is new."""
        kind = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call"}[delta.kind]
        last = self.items[-1] if self.items else None
        if kind != "function_call" and last is not None and last["type"] == kind:
            _part(last)["text"] += delta.text
            return last, False
        self.items.append(_new_item(kind, delta))
        return self.items[-1], True


def _new_item(kind: str, delta: Delta) -> dict:
    if kind == "function_call":
        call = delta.call
        return {
            "type": "function_call",
            "id": "fc_" + call.id.removeprefix("call_"),
            "call_id": call.id,
            "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
            "status": "completed",
        }
    if kind == "reasoning":
        part = {"type": "reasoning_text", "text": delta.text}
        return {
            "type": "reasoning",
            "id": make_id("rs_"),
            "summary": [],
            "content": [part],
            "status": "completed",
        }
    part = {"type": "output_text", "text": delta.text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": make_id("msg_"),
        "role": "assistant",
        "status": "completed",
        "content": [part],
    }


def _part(item: dict) -> dict:
    return item["content"][0]


def _finished(head: dict, output: _Output, finished: Answered) -> dict:
    u = finished.usage
    usage = {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": finished.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
    incomplete = finished.reason == "length"
    for item in output.items:
        item["status"] = "incomplete" if incomplete and item is output.items[-1] else "completed"
    return {
        **head,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output.items,
        "usage": usage,
    }


def _answer(head: dict, events) -> JsonResponse | None:
    output = _Output()
    for event in events:
        if isinstance(event, Finished):
            return JsonResponse(_finished(head, output, event))
        if isinstance(event, Delta):
            output.add(event)
    return None


def _stream(head: dict, events):
    """The Responses event sequence: created, in_progress, per item added → deltas → done, completed."""
    sequence = 0

    def emit(kind: str, **data) -> tuple[str, str]:
        nonlocal sequence
        sequence += 1
        return kind, json.dumps({"type": kind, "sequence_number": sequence - 1, **data})

    output, open_item = _Output(), None
    start = {**head, "status": "in_progress", "output": [], "usage": None}
    yield emit("response.created", response=start)
    yield emit("response.in_progress", response=start)
    try:
        for event in events:
            if isinstance(event, Heartbeat):
                yield None, None
            elif isinstance(event, Finished):
                if open_item is not None:
                    yield from _item_done(emit, output, open_item)
                response = _finished(head, output, event)
                done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
                yield emit(done, response=response)
            elif isinstance(event, Delta):
                item, new = output.add(event)
                if new and open_item is not None:
                    yield from _item_done(emit, output, open_item)
                if new:
                    open_item = item
                    yield from _item_added(emit, output, item)
                yield from _item_delta(emit, output, item, event)
    except ApiError as e:
        yield emit("error", code=e.code, message=e.message, param=e.param)


def _item_added(emit, output: _Output, item: dict):
    index = output.items.index(item)
    if item["type"] == "function_call":
        yield emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
        return
    empty = {**_part(item), "text": ""}
    yield emit(
        "response.output_item.added",
        output_index=index,
        item={**item, "status": "in_progress", "content": []},
    )
    yield emit(
        "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=empty
    )


def _item_delta(emit, output: _Output, item: dict, delta: Delta):
    index = output.items.index(item)
    if item["type"] == "function_call":
        yield emit(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=index,
            delta=item["arguments"],
        )
    elif item["type"] == "reasoning":
        yield emit(
            "response.reasoning_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=delta.text,
        )
    else:
        yield emit(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=delta.text,
            logprobs=[],
        )


def _item_done(emit, output: _Output, item: dict):
    index = output.items.index(item)
    ids = {"item_id": item["id"], "output_index": index}
    if item["type"] == "function_call":
        yield emit(
            "response.function_call_arguments.done", **ids, name=item["name"], arguments=item["arguments"]
        )
    else:
        part = _part(item)
        if item["type"] == "reasoning":
            yield emit("response.reasoning_text.done", **ids, content_index=0, text=part["text"])
        else:
            yield emit("response.output_text.done", **ids, content_index=0, text=part["text"], logprobs=[])
        yield emit("response.content_part.done", **ids, content_index=0, part=part)
    yield emit("response.output_item.done", output_index=index, item=item)
