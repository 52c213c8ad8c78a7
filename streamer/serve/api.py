"""What the OpenAI and Anthropic front ends share: settings, typed request fields, prompt rendering,
the context-length check, and running a job while watching the client.

Each API module turns its request JSON into a ``Job`` with these helpers and shapes the worker's
events into its own response format; ``ApiError`` carries a 4xx/5xx status and a message that each
API renders in its own error JSON.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import jinja2

from streamer.errors import ConfigError
from streamer.generation.constrained import Constraint, GrammarError, Vocabulary
from streamer.generation.sampling import SamplingParams, default_sampling_params
from streamer.serve.tool_calls import THINK_CLOSE, Delta, OutputParser
from streamer.serve.worker import Failed, Finished, GenerationWorker, Job, Piece, TokenLogprob

# Request sampling fields that may override the server's defaults: field name -> (type, low, high).
SAMPLING_FIELDS = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),  # 0 itself is refused below: nothing would be left to sample
    "top_k": (int, -1, None),
    "min_p": (float, 0.0, 1.0),
    "presence_penalty": (float, -2.0, 2.0),
    "repetition_penalty": (float, 0.0, None),
    "seed": (int, -1, 2**64 - 1),  # -1: a random seed, as llama.cpp and vLLM read it
}


class ApiError(Exception):
    """A request the server refuses; each API renders it in its own error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


@dataclass
class ServeSettings:
    """Server-wide behaviour, filled from ``streamer serve`` flags."""

    model_names: tuple[str, ...]  # the first is the id /v1/models lists
    context_length: int
    accept_any_model: bool = False
    default_max_tokens: int = 4096
    thinking: bool = True
    sampling_overrides: dict = field(default_factory=dict)  # SamplingParams fields set by flags
    api_key: str | None = None
    generation_config: dict = field(default_factory=dict)
    heartbeat_s: float = 10.0  # a stream idle this long (queued, long prefill) gets a keep-alive

    @property
    def model_id(self) -> str:
        return self.model_names[0]

    def check_model(self, name) -> str:
        """The model name to echo back; unknown names are a 404 unless any name is accepted."""
        if name is None:
            return self.model_id
        if not isinstance(name, str):
            raise ApiError(400, f"model must be a string, got {type(name).__name__}", param="model")
        if name in self.model_names or self.accept_any_model:
            return name
        raise ApiError(
            404,
            f"model {name!r} is not served here; this server runs {self.model_id!r} "
            "(or start it with --any-model to accept every name)",
            kind="not_found_error",
            param="model",
        )

    def sampling(self, thinking: bool, request: dict) -> SamplingParams:
        """The model's defaults for the mode, then the server's flags, then the request's own values."""
        base = default_sampling_params(self.generation_config, thinking)
        values = {**self.sampling_overrides, **request}
        if values.get("top_k") == -1:
            values["top_k"] = 0
        try:
            return dataclasses.replace(base, **values)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None


class Fields:
    """Typed access to a JSON request body: every wrong type or range is a 400 naming the field."""

    def __init__(self, body, where: str | None = None):
        """``where``: the request field this object is (errors then name it as their param)."""
        if not isinstance(body, dict):
            if where is not None:
                raise ApiError(400, f"{where} must be an object, got {_json_type(body)}", param=where)
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        self.body, self.where = body, where

    def _error(self, name: str, message: str) -> ApiError:
        full = f"{self.where}.{name}" if self.where else name
        return ApiError(400, full + message, param=self.where or name)

    def get(self, name: str, types: type | tuple, default=None, required: bool = False):
        value = self.body.get(name)
        if value is None:
            if required:
                raise self._error(name, " is required")
            return default
        bad_bool = isinstance(value, bool) and bool not in _as_tuple(types)  # True is an int in Python
        if bad_bool or not isinstance(value, types):
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _as_tuple(types))
            raise self._error(name, f" must be {names}, got {_json_type(value)}")
        return value

    def number(self, name: str, low: float | None = None, high: float | None = None, integer: bool = False):
        value = self.get(name, int if integer else (int, float))
        if value is None:
            return None
        finite = not isinstance(value, float) or math.isfinite(value)  # JSON allows NaN and 1e999
        if not finite or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise self._error(name, f" must be in {bounds}, got {value}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        return self.get(name, bool, default)

    def stop_list(self, name: str) -> list[str]:
        value = self.get(name, (str, list), [])
        stops = [value] if isinstance(value, str) else value
        if not all(isinstance(s, str) for s in stops) or len(stops) > 16:
            raise ApiError(400, f"{name} must be a string or a list of at most 16 strings", param=name)
        return [s for s in stops if s]

    def sampling_values(self) -> dict:
        """The request's sampling fields that are present, checked."""
        out = {}
        for name, (kind, low, high) in SAMPLING_FIELDS.items():
            value = self.number(name, low, high, integer=kind is int)
            if value is not None:
                out[name] = kind(value)
        if out.get("top_p") == 0:
            raise ApiError(
                400, "top_p must be in (0, 1], got 0 (it would leave no token to sample)", param="top_p"
            )
        if out.get("seed") == -1:
            out["seed"] = None  # a fresh random seed
        return out


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _json_type(value) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass
class Prompt:
    ids: list[int]
    boundary: int | None  # ids[:boundary] is the conversation so far: worth a snapshot
    thinking: bool  # the answer starts inside a <think> block


def merge_system(messages: list[dict]) -> list[dict]:
    """``messages`` with every system message (OpenAI's developer role maps onto it) moved into one leading
    system message: their texts in order, joined by a blank line; empty ones dropped.

    The Qwen3.5 template accepts one system message and only as the first; clients send more (LangChain,
    several system prompts) or put one later (pydantic-ai's retry instructions). This is what vLLM's and
    llama.cpp's handling of such templates amounts to, and keeps every instruction in front of the model.
    """
    systems = [m for m in messages if m["role"] == "system"]
    if not systems or (len(systems) == 1 and messages[0] is systems[0]):
        return messages
    text = "\n\n".join(t for m in systems if (t := m.get("content") or ""))
    return [{"role": "system", "content": text}, *(m for m in messages if m["role"] != "system")]


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None, thinking: bool) -> Prompt:
    """The prompt ids for template-form messages, with the snapshot boundary before the new answer.

    A final assistant message is a prefill: the answer continues its text (with thinking off).
    """
    messages = merge_system(messages)
    continuing = messages and messages[-1].get("role") == "assistant"
    try:
        if continuing:
            prefix = messages[-1].get("content") or ""
            head = tokenizer.apply_chat_template(messages[:-1], tools=tools, enable_thinking=False)
            history, full, thinking = None, head + prefix, False
        else:
            kwargs = {"tools": tools, "enable_thinking": thinking}
            history = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
            full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    if history is None or not full.startswith(history):
        return Prompt(tokenizer.encode(full), None, thinking)
    # The generation prompt starts with a special token, so encoding the two parts apart is exact.
    head_ids = tokenizer.encode(history)
    return Prompt(head_ids + tokenizer.encode(full[len(history) :]), len(head_ids), thinking)


def make_job(
    ctx: ApiContext,
    f: Fields,
    ids: list[int],
    budget: int,
    *,
    thinking: bool,
    stop_param: str,
    snapshot_at: tuple[int, ...],
    label: str,
    logprobs: int | None = None,
    constraint: Constraint | None = None,
) -> Job:
    """The generation job every API dialect asks for: sampling from the request over the server's
    defaults, stop strings from the dialect's own parameter (``stop`` / ``stop_sequences``)."""
    return Job(
        ids,
        budget,
        ctx.settings.sampling(thinking, f.sampling_values()),
        stop=f.stop_list(stop_param),
        snapshot_at=snapshot_at,
        ignore_eos=f.flag("ignore_eos"),
        logprobs=logprobs,
        label=label,
        constraint=constraint,
    )


def make_constraint(
    ctx: ApiContext,
    grammar: Callable[[], str] | None,
    thinking: bool,
    param: str,
    ignore_eos: bool = False,
) -> Constraint | None:
    """The compiled grammar a request's answer must follow (None: no grammar); a bad one (say, a JSON
    schema the grammar library cannot compile) is a 400 naming ``param``, and so is ``ignore_eos`` with a
    grammar (a complete grammar allows only the end of the answer, which ignore_eos would refuse).

    ``grammar`` writes the grammar text (see ``streamer.generation.constrained``). When the answer starts
    with reasoning, the grammar applies after ``</think>``: the model thinks freely, then writes what the
    grammar allows (the reasoning counts against the same max_tokens).
    """
    if grammar is None:
        return None
    if ignore_eos:
        raise ApiError(
            400,
            f"ignore_eos cannot be combined with {param}: a constrained answer ends at end-of-sequence once "
            f"its grammar is complete; drop ignore_eos (or {param})",
            param="ignore_eos",
        )
    start_after = None
    if thinking:
        start_after = ctx.tokenizer.token_id(THINK_CLOSE)
        if start_after is None:
            raise ApiError(
                400,
                f"{param} cannot follow thinking on this model (its tokenizer has no {THINK_CLOSE} token); "
                "turn thinking off for this request",
                param=param,
            )
    try:
        return Constraint(ctx.vocabulary(), grammar(), start_after)
    except GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


def completion_budget(
    settings: ServeSettings,
    prompt_tokens: int,
    requested: int | None,
    param: str,
    prompt_param: str = "messages",
    anthropic: bool = False,
) -> int:
    """max_tokens for a request: what it asked for, or the server default, within the context length.

    Too long is a 400 in the API's own words: OpenAI's code ``context_length_exceeded`` (param: the
    prompt's field), Anthropic's "prompt is too long: N tokens > M maximum".
    """
    room = settings.context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise _too_long(settings, prompt_tokens, 1, param, prompt_param, anthropic)
        return min(settings.default_max_tokens, room)
    if requested > room:
        raise _too_long(settings, prompt_tokens, requested, param, prompt_param, anthropic)
    return requested


def _too_long(
    settings: ServeSettings,
    prompt_tokens: int,
    completion: int,
    param: str,
    prompt_param: str,
    anthropic: bool,
) -> ApiError:
    limit = settings.context_length
    if anthropic:
        if prompt_tokens >= limit:
            message = f"prompt is too long: {prompt_tokens} tokens > {limit - 1} maximum"
        else:
            message = (
                f"input length and `{param}` exceed context limit: {prompt_tokens} + {completion} > {limit}, "
                f"decrease input length or `{param}` and try again"
            )
        return ApiError(400, message, param=prompt_param)
    return ApiError(
        400,
        f"this model's maximum context length is {limit} tokens, but the request "
        f"needs {prompt_tokens + completion} ({prompt_tokens} in the {prompt_param}, {completion} for the "
        f"completion); shorten the {prompt_param} or lower {param}",
        param=prompt_param,
        code="context_length_exceeded",
    )


def make_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


ClientGone = Callable[[], bool]


class Heartbeat:
    """Nothing new for a while (queued, or a long prefill): streams send a keep-alive."""


HEARTBEAT = Heartbeat()


def run_job(ctx: ApiContext, job: Job, poll_s: float = 0.2) -> Iterator:
    """Submits ``job`` and yields its ``Piece`` / ``Finished`` events, and ``HEARTBEAT`` when idle.

    Cancels the job when the client disconnects (checked every ``poll_s`` while waiting) or when the
    consumer stops early (a failed write closes this generator). A worker failure raises ApiError 500.
    """
    for _, event in run_jobs(ctx, [job], poll_s):
        yield event


class _Tagged:
    """A job's event queue that puts ``(index, event)`` into a queue shared by a request's jobs."""

    def __init__(self, shared: queue.Queue, index: int):
        self.shared, self.index = shared, index

    def put(self, event) -> None:
        self.shared.put((self.index, event))


def run_jobs(ctx: ApiContext, jobs: list[Job], poll_s: float = 0.2) -> Iterator[tuple[int | None, object]]:
    """Submits the jobs of one request together (they join the batch together) and yields
    ``(job index, event)`` as the events come, and ``(None, HEARTBEAT)`` when idle; ends when every job
    has finished.

    Cancels every unfinished job when the client disconnects (checked every ``poll_s`` while waiting) or
    when the consumer stops early. A worker failure of any job raises ApiError (and cancels the rest).
    """
    client_gone, heartbeat_s = ctx.client_gone, ctx.settings.heartbeat_s
    shared: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        job.events = _Tagged(shared, i)
    for job in jobs:
        ctx.worker.submit(job)
    running = set(range(len(jobs)))
    checked = last_event = time.monotonic()
    try:
        while running:
            try:
                i, event = shared.get(timeout=poll_s)
                last_event = time.monotonic()
            except queue.Empty:
                i, event = None, None
            if time.monotonic() - checked >= poll_s:
                checked = time.monotonic()
                if client_gone():
                    return
            if event is None:
                if time.monotonic() - last_event >= heartbeat_s:
                    last_event = time.monotonic()
                    yield None, HEARTBEAT
                continue
            if isinstance(event, (Failed, Finished)):
                running.discard(i)
            if isinstance(event, Failed):
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise ApiError(event.status, event.message, kind=kind)
            yield i, event
    finally:
        for i in running:
            jobs[i].cancelled.set()


def choice_jobs(job: Job, n: int, constraint: Callable[[], Constraint | None] = lambda: None) -> list[Job]:
    """``n`` jobs for the ``n`` choices of one request: ``job`` with choice i's own events, sampler seed
    (the request's seed + i, so choices differ under sampling and the response stays reproducible) and
    constraint (a grammar's state belongs to one answer)."""
    jobs = []
    for i in range(n):
        seed = job.sampling.seed
        sampling = dataclasses.replace(job.sampling, seed=None if seed is None else (seed + i) % 2**64)
        label = job.label if n == 1 else f"{job.label}/{i}"
        jobs.append(
            dataclasses.replace(
                job,
                sampling=sampling,
                label=label,
                constraint=job.constraint if i == 0 else constraint(),
                events=queue.Queue(),
                cancelled=threading.Event(),
                prefill_from=jobs[0] if jobs else None,  # the prompt is read once, for every choice
            )
        )
    return jobs


@dataclass
class Logprobs:
    """The sampled tokens of the deltas that follow (only when the job asked for logprobs)."""

    tokens: list[TokenLogprob]


@dataclass
class Answered(Finished):
    """The worker's ``Finished`` with the answer's reasoning tokens (generated before ``</think>``)."""

    reasoning_tokens: int = 0


class AnswerStream:
    """One answer's worker events as answer deltas (reasoning / content / tool calls), then ``Answered``.

    A piece's token logprobs, when asked for, come as one ``Logprobs`` event before its deltas. The
    reasoning before each tool call goes into ``memory``, keyed by the call's id.

    Args:
        parser: splits the text (None: all of it is content).
        memory: where reasoning before tool calls is kept.
        think_close: the ``</think>`` token id when the answer starts as reasoning (None: it does not).
    """

    def __init__(
        self,
        parser: OutputParser | None,
        memory: ReasoningMemory | None = None,
        think_close: int | None = None,
    ):
        self.parser, self.memory, self.think_close = parser, memory, think_close
        self.reasoning: list[str] = []
        self.text = ""  # the answer so far, until </think> shows in it
        self.pieces_before_close = 0

    def feed(self, event) -> list:
        if isinstance(event, Heartbeat):
            return [event]
        out = []
        if isinstance(event, Piece):
            if event.logprobs:
                out.append(Logprobs(event.logprobs))
            self._count(event.text)
            deltas = self.parser.feed(event.text) if self.parser else [Delta("content", event.text)]
        else:
            deltas = [*(self.parser.finish() if self.parser else []), self._answered(event)]
        for delta in deltas:
            if isinstance(delta, Delta) and delta.kind == "reasoning":
                self.reasoning.append(delta.text)
            elif isinstance(delta, Delta) and delta.kind == "tool_call" and self.memory and self.reasoning:
                self.memory.remember(delta.call.id, "".join(self.reasoning))
            out.append(delta)
        return out

    def _count(self, text: str) -> None:
        if self.text is not None:
            self.text += text
            if THINK_CLOSE in self.text:
                self.text = None
            else:
                self.pieces_before_close += 1

    def _answered(self, finished: Finished) -> Answered:
        fields = {f.name: getattr(finished, f.name) for f in dataclasses.fields(Finished)}
        return Answered(**fields, reasoning_tokens=self._reasoning_tokens(finished.token_ids))

    def _reasoning_tokens(self, ids: list[int]) -> int:
        if self.think_close is None:
            return 0
        if ids and min(ids) < 0:  # a scripted model's tokens: one piece each
            return self.pieces_before_close
        return ids.index(self.think_close) if self.think_close in ids else len(ids)


def answer_events(
    events: Iterator,
    parser: OutputParser | None,
    memory: ReasoningMemory | None = None,
    think_close: int | None = None,
) -> Iterator[Delta | Logprobs | Answered | Heartbeat]:
    """Worker events of one job as answer events (see ``AnswerStream``)."""
    stream = AnswerStream(parser, memory, think_close)
    for event in events:
        yield from stream.feed(event)


def choice_events(
    events: Iterator[tuple[int | None, object]], streams: list[AnswerStream]
) -> Iterator[tuple[int | None, Delta | Logprobs | Answered | Heartbeat]]:
    """``run_jobs``'s events as ``(choice index, answer event)``, each choice through its own stream."""
    for i, event in events:
        if i is None:
            yield None, event
            continue
        for out in streams[i].feed(event):
            yield i, out


def think_close_id(ctx: ApiContext, thinking: bool) -> int | None:
    """The ``</think>`` id that ends an answer's reasoning (None when the answer does not start thinking)."""
    return ctx.tokenizer.token_id(THINK_CLOSE) if thinking else None


class ReasoningMemory:
    """The reasoning this server wrote before its tool calls, by call id, for clients that drop it.

    Qwen3.5's template shows the model its reasoning for the turns since the last user message, but
    OpenAI clients do not send ``reasoning_content`` back. Putting it back keeps the model's plan in
    front of it during a tool loop, and makes the prompt match the snapshot taken at the answer's end.
    """

    def __init__(self, max_entries: int = 1024):
        self._items: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def remember(self, call_id: str, reasoning: str) -> None:
        with self._lock:
            self._items[_call_key(call_id)] = reasoning
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def fill(self, messages: list[dict]) -> None:
        """Adds the remembered reasoning to assistant messages with tool calls that come without any."""
        for m in messages:
            if m["role"] != "assistant" or m.get("reasoning_content") or not m.get("tool_calls"):
                continue
            with self._lock:
                found = [self._items.get(_call_key(c.get("id"))) for c in m["tool_calls"]]
            if any(found):
                m["reasoning_content"] = next(r for r in found if r)


def _call_key(call_id) -> str:
    # The same call is "call_X" to OpenAI clients and "toolu_X" to Anthropic ones.
    return str(call_id).removeprefix("toolu_").removeprefix("call_")


@dataclass
class JsonResponse:
    body: dict
    status: int = 200


@dataclass
class EventStream:
    """A server-sent event stream: (event name or None, data text) pairs; data None is a keep-alive."""

    events: Iterator[tuple[str | None, str | None]]


@dataclass
class ApiContext:
    """What a request handler needs: settings, the tokenizer, the worker, and a disconnect probe."""

    settings: ServeSettings
    tokenizer: object
    worker: GenerationWorker
    client_gone: ClientGone = lambda: False
    memory: ReasoningMemory = field(default_factory=ReasoningMemory)
    # The tokenizer in the grammar library's form (built on first use: about a second for 248k ids).
    vocabulary: Callable[[], Vocabulary] = lambda: _no_vocabulary()


def _no_vocabulary() -> Vocabulary:
    raise ApiError(500, "constrained decoding is not set up on this server", kind="server_error")
