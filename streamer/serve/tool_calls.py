"""Split a Qwen3.5 answer into reasoning, content and tool calls, incrementally as text streams in.

Qwen3.5 thinks inside ``<think>…</think>`` (the chat template opens the block, so with thinking on
the answer starts inside it) and calls tools in XML::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

``OutputParser.feed`` takes text pieces as the detokenizer produces them and returns ``Delta`` events
as soon as they are certain: text that may be the start of a tag (``<tool_c``) or whitespace that the
template puts around tags is held back until the next piece decides it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


@dataclass
class Delta:
    """One piece of the answer: reasoning text, content text, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    call: ToolCall | None = None


class OutputParser:
    """Turns the streamed answer text into ``Delta`` events (reasoning, content, tool calls).

    Args:
        thinking: the prompt opened a ``<think>`` block, so the answer starts as reasoning.
        tools: the request's tools (OpenAI form ``{"type": "function", "function": {...}}`` or bare
            ``{"name", "parameters"}``); their JSON schemas type the parsed arguments. None turns
            tool-call parsing off (the XML stays in the content).
    """

    def __init__(self, thinking: bool, tools: list[dict] | None = None):
        self._state = "reasoning" if thinking else "content"
        self._schemas = _schemas_by_name(tools) if tools is not None else None
        self._buf = ""
        self._lstrip = True  # drop whitespace the template puts after an opening / closing tag
        self._started = False  # any content emitted yet (a <think> only opens reasoning at the start)
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Delta]:
        """Adds a piece of answer text; returns the events it completes."""
        self._buf += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """The answer ended: flushes held-back text; an unfinished tool call comes out as content."""
        out = self.feed("")
        rest, self._buf = self._buf.rstrip(), ""
        if self._state == "tool_call":
            # Cut off before </tool_call> (max_tokens): its arguments may be incomplete, so never run it.
            rest, self._state = CALL_OPEN + rest, "content"
        self._emit(out, self._state, rest)
        return out

    def _step(self, out: list[Delta]) -> bool:
        """Consumes what the buffer settles; True while there may be more to consume."""
        if self._lstrip:
            stripped = self._buf.lstrip()
            if not stripped:
                self._buf = ""
                return False
            self._buf, self._lstrip = stripped, False
        if self._state == "tool_call":
            end = self._buf.find(CALL_CLOSE)
            if end < 0:
                return False
            call = parse_tool_call(self._buf[:end], self._schemas or {})
            if call is None:  # not a call after all: show it as text
                self._emit(out, "content", CALL_OPEN + self._buf[: end + len(CALL_CLOSE)])
            else:
                self.tool_calls.append(call)
                out.append(Delta("tool_call", call=call))
            self._buf = self._buf[end + len(CALL_CLOSE) :]
            self._state, self._lstrip = "content", call is not None
            return True
        tags = self._tags()
        found = ((self._buf.find(t), t) for t in tags)
        # A <think> opens reasoning only at the very start of the answer.
        hit = min(((i, t) for i, t in found if i == 0 or (i > 0 and t != THINK_OPEN)), default=None)
        if hit is not None:
            i, tag = hit
            self._emit(out, self._state, self._buf[:i].rstrip())
            self._buf = self._buf[i + len(tag) :]
            self._state = {THINK_OPEN: "reasoning", THINK_CLOSE: "content", CALL_OPEN: "tool_call"}[tag]
            self._lstrip = tag != CALL_OPEN  # a call's body is kept verbatim (it may become text)
            return True
        # Hold back a possible partial tag and trailing whitespace (it may precede a tag).
        keep = max((_partial_suffix(self._buf, t) for t in tags), default=0)
        safe = self._buf[: len(self._buf) - keep]
        ready = safe.rstrip()
        self._emit(out, self._state, ready)
        self._buf = self._buf[len(ready) :]
        return False

    def _tags(self) -> list[str]:
        if self._state == "reasoning":
            return [THINK_CLOSE]
        tags = [CALL_OPEN] if self._schemas is not None else []
        return tags if self._started else [*tags, THINK_OPEN]

    def _emit(self, out: list[Delta], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "content":
            self._started = True
        if out and out[-1].kind == kind:
            out[-1].text += text
        else:
            out.append(Delta(kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _schemas_by_name(tools: list[dict]) -> dict[str, dict]:
    schemas = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters") or fn.get("input_schema") or {}
            schemas[fn["name"]] = params.get("properties", {}) if isinstance(params, dict) else {}
    return schemas


def parse_tool_call(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    """Parses the inside of one ``<tool_call>`` block; None when it holds no function.

    Args:
        body: the text between ``<tool_call>`` and ``</tool_call>`` (XML, or Qwen3's older JSON form).
        schemas: tool name -> JSON-schema ``properties``, to type each argument.
    """
    body = body.strip()
    if body.startswith("{"):
        return _parse_json_call(body)
    match = _FUNCTION.search(body)
    if match is None:
        return None
    name = match.group(1).strip()
    properties = schemas.get(name, {})
    arguments = {}
    for param in _PARAMETER.finditer(match.group(2)):
        key = param.group(1).strip()
        arguments[key] = convert_argument(_strip_newline(param.group(2)), properties.get(key))
    return ToolCall(name, arguments)


def _parse_json_call(body: str) -> ToolCall | None:
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    arguments = doc.get("arguments", doc.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(doc["name"], arguments) if isinstance(arguments, dict) else None


def _strip_newline(value: str) -> str:
    # The format puts the value on its own lines: one newline each side belongs to the markup.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def convert_argument(value: str, schema: dict | None):
    """A parameter's text as the JSON type its schema declares; text stays text when it does not parse.

    Parameters without a schema, or declared as strings, are kept verbatim.
    """
    declared = schema.get("type") if isinstance(schema, dict) else None
    types = set(declared) if isinstance(declared, list) else {declared}
    if not types - {None} or "string" in types:
        return value
    stripped = value.strip()
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if "null" in types and stripped.lower() in ("null", "none"):
        return None
    if "integer" in types:
        try:
            return int(stripped)
        except ValueError:
            pass
    if "number" in types:
        try:
            number = float(stripped)
            return int(number) if number.is_integer() and "." not in stripped else number
        except ValueError:
            pass
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        return value
