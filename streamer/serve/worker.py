"""The generation thread that owns the model, and the prefix cache that lets a conversation resume.

HTTP handlers never touch MLX: they submit a ``Job`` and read its ``events`` queue (``Piece`` texts,
then one ``Finished`` or ``Failed``). Jobs run one at a time in arrival order; setting
``job.cancelled`` stops a job between tokens (or between prefill chunks), or skips it while queued.

Prefix reuse (see ``prefix_cache``): the worker snapshots the model state at the boundaries a request
names (the end of the conversation before the new answer starts) and at the end of each answer, keyed
by the token ids fed so far; a request restores the longest snapshot whose ids are a strict prefix of
its prompt and prefills only the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.errors import StreamerError
from streamer.generation.constrained import Constraint
from streamer.generation.generate import GenerationResponse, prefill, stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.serve.prefix_cache import ModelState, PrefixCache, capture_state, restore_state

log = logging.getLogger(__name__)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from a snapshot instead of prefilled
    prefilled_tokens: int = 0  # prompt tokens run through the model
    completion_tokens: int = 0
    ttft_s: float = 0.0  # job start to first token: the prefill time
    generation_tps: float = 0.0


@dataclass
class TokenLogprob:
    """One sampled token's log-probability under the model (log-softmax of its logits, before
    temperature, penalties and filters, as vLLM reports by default), and the most likely alternatives."""

    token: bytes  # what the id decodes to (part of a character for byte-level BPE)
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)  # most likely first


@dataclass
class Piece:
    """New answer text (stop sequences already cut out)."""

    text: str
    # With Job.logprobs set: the tokens sampled since the previous piece (a stop sequence's are dropped).
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop sequence), "length" or "cancelled"
    stop_sequence: str | None
    usage: Usage
    token_ids: list[int] = field(default_factory=list)  # every sampled id (-1 from a scripted model)


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One generation request, as the worker runs it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    snapshot_at: Sequence[int] = ()  # prompt lengths worth a snapshot (message boundaries)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    label: str = ""
    constraint: Constraint | None = None  # a grammar the answer must follow (JSON modes, forced tool calls)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


# The test seam: given a job, the answer text pieces a scripted "model" writes (one per token).
ScriptedModel = Callable[[Job], Sequence[str]]


class JobCancelled(Exception):
    """Raised inside the worker to abandon a job whose client went away."""


class StopMatcher:
    """Cuts a text stream at the first stop sequence, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop sequence found or None)."""
        buf = self._pending + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            i, stop = min(found)
            self._pending = ""
            return buf[:i], stop
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class GenerationWorker:
    """Owns the engine: loads it, runs jobs one at a time from a queue, keeps the prefix cache.

    Args:
        load: builds the Engine; called on the worker thread so all MLX work happens there.
        prefix_cache: where state snapshots are kept.
        scripted: a test seam; when set, jobs get its text pieces instead of the model's.
    """

    def __init__(self, load: Callable, prefix_cache: PrefixCache, scripted: ScriptedModel | None = None):
        self._load = load
        self.prefix_cache = prefix_cache
        self._scripted = scripted
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="streamer-generation", daemon=True)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(
            ("requests", "prompt_tokens", "cached_tokens", "prefilled_tokens", "completion_tokens"), 0
        )
        self._totals["cancelled"] = self._totals["failed"] = 0
        self._recent: deque[dict] = deque(maxlen=64)
        self._engine_stats: dict = {}
        self._current: Job | None = None
        self._progress: tuple[int, int] | None = None  # (prefilled, to prefill) of the current job
        self.engine = None
        self._last_logprob: TokenLogprob | None = None  # set by _LogprobSampler for each sampled token

    def start(self) -> None:
        """Starts the thread and waits for the engine; re-raises a load error here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> Job:
        self._jobs.put(job)
        return job

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancels the job in progress and the queued ones, then stops the thread and closes the engine."""
        if (current := self._current) is not None:
            current.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self._finish(job, "cancelled", None, Usage(len(job.prompt_ids)))
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict:
        """Totals, the last requests, queue depth, prefix-cache and expert-cache counters."""
        with self._lock:
            return {
                "totals": dict(self._totals),
                "recent": list(self._recent),
                "queued": self._jobs.qsize(),
                "busy": self._current is not None,
                "current": self._current.label if self._current else None,
                "prefill_progress": self._progress,
                "prefix_cache": self.prefix_cache.stats(),
                "experts": dict(self._engine_stats),
            }

    def _run(self) -> None:
        try:
            self._load_and_serve()
        finally:
            release_mlx_thread_state()

    def _load_and_serve(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as e:  # handed to start() on the caller's thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while (job := self._jobs.get()) is not None:
                with self._lock:
                    self._current, self._progress = job, None
                try:
                    self._serve(job)
                finally:
                    with self._lock:
                        self._current = self._progress = None
        finally:
            if hasattr(self.engine, "close"):
                self.engine.close()

    def _serve(self, job: Job) -> None:
        usage = Usage(prompt_tokens=len(job.prompt_ids))
        if job.cancelled.is_set():
            self._finish(job, "cancelled", None, usage)
            return
        stopper = StopMatcher(job.stop)
        reason, matched, token_ids = "stop", None, []
        logprobs: list[TokenLogprob] = []  # sampled since the last piece
        self._last_logprob = None
        start = time.perf_counter()
        try:
            stream = self._scripted_stream(job, usage) if self._scripted else self._model_stream(job, usage)
            with closing(stream):
                for r in stream:
                    if job.cancelled.is_set():
                        reason = "cancelled"
                        break
                    if r.generation_tokens == 1:
                        usage.ttft_s = time.perf_counter() - start
                    usage.completion_tokens, usage.generation_tps = r.generation_tokens, r.generation_tps
                    token_ids.append(r.token)
                    if job.logprobs is not None and r.finish_reason != "stop":  # not the end-of-sequence id
                        logprobs.append(self._last_logprob or TokenLogprob(r.text.encode(), 0.0))
                    text, matched = stopper.feed(r.text)
                    if text:
                        job.events.put(Piece(text, logprobs))
                        logprobs = []
                    if matched is not None:
                        break
                    if r.finish_reason:
                        reason = r.finish_reason
                        break
        except JobCancelled:
            reason = "cancelled"
        except StreamerError as e:  # e.g. an expert read failed: this request fails, the server goes on
            log.error("generation failed for %s: %s", job.label or "a request", e)
            self._fail(job, f"generation failed: {e}", usage)
            return
        except Exception as e:
            log.exception("generation failed for %s", job.label or "a request")
            self._fail(job, f"generation failed: {type(e).__name__}: {e}", usage)
            return
        if matched is None and (rest := stopper.flush()):
            job.events.put(Piece(rest, logprobs))
        self._finish(job, reason, matched, usage, token_ids)

    def _fail(self, job: Job, message: str, usage: Usage) -> None:
        job.events.put(Failed(message))
        self._record(job, "error", usage)

    def _finish(self, job: Job, reason: str, matched: str | None, usage: Usage, token_ids=()) -> None:
        job.events.put(Finished(reason, matched, usage, list(token_ids)))
        self._record(job, reason, usage)

    def _record(self, job: Job, reason: str, usage: Usage) -> None:
        record = {
            "label": job.label,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "prefilled_tokens": usage.prefilled_tokens,
            "completion_tokens": usage.completion_tokens,
            "finish_reason": reason,
            "ttft_s": round(usage.ttft_s, 4),
            "generation_tps": round(usage.generation_tps, 2),
        }
        engine_stats = self.engine.stats() if hasattr(self.engine, "stats") else {}
        with self._lock:
            self._recent.append(record)
            self._totals["requests"] += 1
            self._totals["cancelled"] += reason == "cancelled"
            self._totals["failed"] += reason == "error"
            for key in ("prompt_tokens", "cached_tokens", "prefilled_tokens", "completion_tokens"):
                self._totals[key] += record[key]
            self._engine_stats = engine_stats

    def _model_stream(self, job: Job, usage: Usage) -> Iterator[GenerationResponse]:
        """Restores the best snapshot, prefills to each boundary (snapshotting), then generates."""
        engine, ids = self.engine, job.prompt_ids
        cache = engine.model.make_cache()
        state = None  # the last snapshot this job's cache descends from (its KV segments are shared)
        if (hit := self.prefix_cache.lookup(ids)) is not None:
            state = hit.state
            restore_state(cache, state)
        start = state.length if state else 0
        usage.cached_tokens, usage.prefilled_tokens = start, len(ids) - start

        prefilled = 0

        def check(done: int, total: int) -> None:
            # Called after every prefill chunk: a long prefill shows progress and stops on cancel.
            self._progress = (prefilled + done, len(ids) - usage.cached_tokens)
            if job.cancelled.is_set():
                raise JobCancelled

        for boundary in sorted(set(job.snapshot_at)):
            if start < boundary < len(ids):
                prefill(engine.model, ids[start:boundary], cache, progress=check)
                state = self._remember(ids[:boundary], cache, state, priority=1)
                prefilled += boundary - start
                start = boundary
        tokenizer = _WithoutEos(engine.tokenizer) if job.ignore_eos else engine.tokenizer
        sampler = make_sampler(job.sampling, context=ids)
        if job.constraint is not None:
            sampler = job.constraint.wrap(sampler)
        if job.logprobs is not None:
            sampler = _LogprobSampler(sampler, job.logprobs, engine.tokenizer, self)
        generated: list[int] = []
        tokens = stream_generate(
            engine.model, tokenizer, ids[start:], sampler, job.max_tokens, cache=cache, prefill_progress=check
        )
        try:
            for r in tokens:
                generated.append(r.token)
                yield r
        except GeneratorExit:
            tokens.close()
            # The last sampled token was never fed: the cache holds the prompt and the tokens before it.
            self._remember([*ids, *generated[:-1]], cache, state, priority=0)
            raise
        self._remember([*ids, *generated[:-1]], cache, state, priority=0)

    def _remember(
        self, ids: list[int], cache: list, base: ModelState | None, priority: int
    ) -> ModelState | None:
        """Snapshots the cache (which has seen ``ids``); returns the state later snapshots build on."""
        if self.prefix_cache.max_bytes <= 0 or ids in self.prefix_cache:
            return base
        state, own_bytes = capture_state(cache, base)
        stored = self.prefix_cache.store(ids, state, own_bytes, state.segments, priority)
        return state if stored else base

    def _scripted_stream(self, job: Job, usage: Usage) -> Iterator[GenerationResponse]:
        usage.prefilled_tokens = len(job.prompt_ids)
        pieces = list(self._scripted(job))[: job.max_tokens]
        for n, text in enumerate(pieces, 1):
            last = n == len(pieces)
            reason = ("length" if n == job.max_tokens else "stop") if last else None
            yield GenerationResponse(-1, text, len(job.prompt_ids), 0.0, n, 0.0, reason)


class _LogprobSampler:
    """Wraps a sampler: also leaves the sampled token's log-probability and the ``top`` most likely
    tokens on ``sink._last_logprob`` (one log-softmax and one partial sort over the vocabulary per token)."""

    def __init__(self, sampler, top: int, tokenizer, sink):
        self.sampler, self.top, self.tokenizer, self.sink = sampler, top, tokenizer, sink

    def __call__(self, logits: mx.array) -> int:
        token = self.sampler(logits)
        logprobs = logits.astype(mx.float32)
        logprobs = logprobs - mx.logsumexp(logprobs)
        if self.top:
            k = min(self.top, logprobs.shape[-1])
            ids = mx.argpartition(-logprobs, k - 1)[:k]
            values = logprobs[ids]
            mx.eval(ids, values, logprobs)
            ranked = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda p: -p[1])
            top = [(self.tokenizer.token_bytes(i), v) for i, v in ranked]
        else:
            top = []
        chosen = logprobs[token].item()
        self.sink._last_logprob = TokenLogprob(self.tokenizer.token_bytes(token), chosen, top)
        return token


class _WithoutEos:
    """The tokenizer as stream_generate sees it, with no end-of-sequence ids (``ignore_eos``)."""

    eos_token_ids = frozenset()

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def detokenizer(self, *args, **kwargs):
        return self._tokenizer.detokenizer(*args, **kwargs)


def release_mlx_thread_state() -> None:
    """Drops the calling thread's MLX state (its random key, streams, compile cache) while the GIL is held.

    Call it last on any non-main thread that ran MLX. Otherwise MLX's thread_local random key is freed
    by a C++ destructor after the thread's Python part ended (``Thread.join`` has already returned);
    that destructor takes the GIL, and if the main thread is finalizing the interpreter meanwhile,
    taking the GIL calls pthread_exit inside a noexcept destructor: "terminate called without an
    active exception" and SIGABRT (Ctrl-C on `streamer serve`). With the key dropped it does nothing.
    """
    mx.clear_streams()
