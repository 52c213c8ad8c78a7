"""The generation thread that owns the model, and the prefix cache that lets a conversation resume.

HTTP handlers never touch MLX: they submit a ``Job`` and read its ``events`` queue (``Piece`` texts,
then one ``Finished`` or ``Failed``). Jobs run together on one ``Scheduler`` (continuous batching: a
job joins the running batch at the next step, its prompt read a chunk per step between the running
decodes); setting ``job.cancelled`` stops a job at the next step, or drops it while it waits.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.errors import StreamerError
from streamer.generation.constrained import Constraint
from streamer.generation.generate import token_text
from streamer.generation.prefix_cache import ModelState, PrefixCache, capture_state, restore_state
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.generation.scheduler import (
    DEFAULT_MAX_BATCH,
    PREFILL_CHUNK,
    GenSequence,
    MemoryBudgetError,
    Scheduler,
)

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
    status: int = 500  # the HTTP status it becomes: 400 for a request that can never run (too big)


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
    # Another choice of the same request (same prompt), submitted first: this job adopts that one's prompt
    # state instead of reading the prompt again, when it joins while that one is still reading it.
    prefill_from: Job | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


# The test seam: given a job, the answer text pieces a scripted "model" writes (one per token).
ScriptedModel = Callable[[Job], Sequence[str]]


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


@dataclass(frozen=True)
class BatchSettings:
    """How the worker batches requests (``streamer serve --max-batch / --prefill-chunk / --max-state-gb``)."""

    max_batch: int = DEFAULT_MAX_BATCH  # requests decoded together
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per prefill call, between the running decodes
    max_state_bytes: int | None = None  # KV + DeltaNet bytes the running requests may reserve (None: any)


class _Active:
    """One job while it runs: its sequence, usage, stop matcher and what it has sent."""

    def __init__(self, job: Job, tokenizer=None):
        self.job = job
        self.usage = Usage(prompt_tokens=len(job.prompt_ids))
        self.stopper = StopMatcher(job.stop)
        self.matched: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # sampled since the last piece
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.start = time.perf_counter()
        self.seq: GenSequence | None = None
        self.state: ModelState | None = None  # the last snapshot the job's cache descends from
        self.begin_state: ModelState | None = None  # the snapshot the job started from

    def token(
        self, token: int, text: str, reason: str | None, tps: float, logprob: TokenLogprob | None
    ) -> bool:
        """Sends a sampled token's text; True when a stop sequence ends the answer here."""
        self.usage.completion_tokens += 1
        self.usage.generation_tps = tps
        if self.usage.completion_tokens == 1:
            self.usage.ttft_s = time.perf_counter() - self.start
        self.token_ids.append(token)
        if self.job.logprobs is not None and reason != "stop":  # not the end-of-sequence id
            self.logprobs.append(logprob or TokenLogprob(text.encode(), 0.0))
        text, self.matched = self.stopper.feed(text)
        if text:
            self.job.events.put(Piece(text, self.logprobs))
            self.logprobs = []
        return self.matched is not None


class GenerationWorker:
    """Owns the engine: loads it, runs the submitted jobs together on one scheduler, keeps the prefix cache.

    Jobs join the running batch at the next step (up to ``batch.max_batch``; more wait in arrival order);
    each is a ``GenSequence`` whose callbacks turn tokens into ``Piece`` events, snapshot its state at the
    boundaries it names and at its end, and report how it finished.

    Args:
        load: builds the Engine; called on the worker thread so all MLX work happens there.
        prefix_cache: where state snapshots are kept.
        scripted: a test seam; when set, jobs get its text pieces instead of the model's, one at a time.
        batch: how requests are batched.
    """

    def __init__(
        self,
        load: Callable,
        prefix_cache: PrefixCache,
        scripted: ScriptedModel | None = None,
        batch: BatchSettings | None = None,
    ):
        self._load = load
        self.prefix_cache = prefix_cache
        self._scripted = scripted
        self.batch = batch or BatchSettings()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="streamer-generation", daemon=True)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(
            ("requests", "prompt_tokens", "cached_tokens", "prefilled_tokens", "completion_tokens"), 0
        )
        self._totals["cancelled"] = self._totals["failed"] = self._totals["sequences"] = 0
        self._recent: deque[dict] = deque(maxlen=64)
        self._engine_stats: dict = {}
        self._active: list[_Active] = []  # admitted to the scheduler or running scripted, oldest first
        self._scheduler: Scheduler | None = None
        self.engine = None

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
        """Cancels the running and the queued jobs, then stops the thread and closes the engine."""
        for active in list(self._active):
            active.job.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self._finish(_Active(job), "cancelled")
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict:
        """Totals, the last requests, the batch and queue, prefix-cache and expert-cache counters."""
        with self._lock:
            active = list(self._active)
            scheduler = self._scheduler
            prefilling = next((a for a in active if a.seq is not None and a.seq.prefilling), None)
            waiting = len(scheduler.waiting) if scheduler else 0
            return {
                "totals": dict(self._totals),
                "recent": list(self._recent),
                "queued": self._jobs.qsize() + waiting,
                "busy": bool(active),
                "running": len(active) - waiting,
                "current": active[0].job.label if active else None,
                "prefill_progress": (prefilling.seq.fed, prefilling.usage.prefilled_tokens)
                if prefilling
                else None,
                "batch": {
                    "max_batch": self.batch.max_batch,
                    "prefill_chunk": self.batch.prefill_chunk,
                    "max_state_bytes": self.batch.max_state_bytes,
                    "reserved_state_bytes": scheduler.reserved_bytes if scheduler else 0,
                    "decode_steps": scheduler.decode_steps if scheduler else 0,
                    "decoded_tokens": scheduler.decoded_tokens if scheduler else 0,
                    "largest_batch": scheduler.largest_batch if scheduler else 0,
                },
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
        if hasattr(self.engine, "stats"):  # /v1/stats shows the cache and routing from the start
            self._engine_stats = self.engine.stats()
        self._ready.set()
        try:
            if self._scripted:
                while (job := self._jobs.get()) is not None:
                    self._serve_scripted(job)
                return
            b = self.batch
            self._scheduler = Scheduler(self.engine.model, b.max_batch, b.prefill_chunk, b.max_state_bytes)
            while self._take_new_jobs():
                self._cancel_abandoned()
                self._scheduler.step()
            for active in list(self._active):  # closing: the running jobs end as "cancelled"
                active.seq.cancel()
            self._scheduler.step()
        finally:
            if hasattr(self.engine, "close"):
                self.engine.close()

    def _take_new_jobs(self) -> bool:
        """Admits the jobs that arrived (waiting for one when idle); False once close() was called."""
        while True:
            try:
                job = self._jobs.get(block=not self._scheduler.busy)
            except queue.Empty:
                return True
            if job is None:
                return False
            self._begin(job)

    def _cancel_abandoned(self) -> None:
        for active in self._active:
            if active.job.cancelled.is_set() and active.seq is not None:
                active.seq.cancel()

    # ---- one job on the scheduler --------------------------------------------------------------------

    def _begin(self, job: Job) -> None:
        """Restores the job's best snapshot and queues its sequence on the scheduler."""
        active = _Active(job, self.engine.tokenizer)
        if job.cancelled.is_set():
            self._finish(active, "cancelled")
            return
        engine, ids = self.engine, job.prompt_ids
        cache = engine.model.make_cache()
        leader = self._leader_of(job)
        if leader is not None:  # start where the other choice started; adopt its state after the prompt
            active.state = leader.begin_state
        elif (hit := self.prefix_cache.lookup(ids)) is not None:
            active.state = hit.state
        if active.state is not None:
            restore_state(cache, active.state)
        active.begin_state = active.state
        start = active.state.length if active.state else 0
        active.usage.cached_tokens, active.usage.prefilled_tokens = start, len(ids) - start
        sampler = make_sampler(job.sampling, context=ids)
        if job.constraint is not None:
            sampler = job.constraint.wrap(sampler)
        if job.logprobs is not None:
            sampler = _LogprobSampler(sampler, job.logprobs, engine.tokenizer)
        eos = frozenset() if job.ignore_eos else frozenset(engine.tokenizer.eos_token_ids)
        seq = GenSequence(
            ids[start:], sampler, job.max_tokens, cache, eos,
            boundaries=sorted({b - start for b in job.snapshot_at if start < b < len(ids)}),
            on_token=lambda s, token, reason: self._on_token(active, token, reason),
            on_boundary=lambda s, n: self._on_boundary(active, n),
            on_finish=lambda s: self._on_finish(active),
            label=job.label,
            follows=leader.seq if leader is not None else None,
        )  # fmt: skip
        active.seq = seq
        try:
            self._scheduler.add(seq)
        except MemoryBudgetError as e:
            self._fail(active, f"{e} (streamer serve --max-state-gb)", status=400)
            return
        with self._lock:
            self._active.append(active)

    def _leader_of(self, job: Job) -> _Active | None:
        """The running choice whose prompt state ``job`` can adopt: same prompt, still reading it."""
        if job.prefill_from is None:
            return None
        for active in self._active:
            seq = active.seq
            if active.job is job.prefill_from and seq is not None and seq.prefilling and not seq.done:
                return active if active.job.prompt_ids == job.prompt_ids else None
        return None

    def _on_token(self, active: _Active, token: int, reason: str | None) -> None:
        text = token_text(active.detok, token, reason)
        logprob = active.seq.sampler.last if isinstance(active.seq.sampler, _LogprobSampler) else None
        if active.token(token, text, reason, active.seq.generation_tps(), logprob):
            active.seq.stop("stop")

    def _on_boundary(self, active: _Active, n: int) -> None:
        ids = active.job.prompt_ids[: active.usage.cached_tokens + n]
        active.state = self._remember(ids, active.seq.cache, active.state, priority=1)

    def _on_finish(self, active: _Active) -> None:
        with self._lock:
            if active in self._active:
                self._active.remove(active)
        # The sequence's callbacks hold ``active``: dropping the link ends the cycle, so its caches go as
        # soon as the job does (under a pipeline, other ranks free their state for it then).
        seq, active.seq = active.seq, None
        if seq.finish_reason == "error":
            e = seq.error
            if isinstance(e, StreamerError):  # e.g. an expert read failed: this request fails, the rest go on
                log.error("generation failed for %s: %s", active.job.label or "a request", e)
                self._fail(active, f"generation failed: {e}")
            else:
                log.error(
                    "generation failed for %s",
                    active.job.label or "a request",
                    exc_info=(type(e), e, e.__traceback__),
                )
                self._fail(active, f"generation failed: {type(e).__name__}: {e}")
            return
        if seq.adopted:  # the prompt was read once, by the choice it followed
            active.usage.cached_tokens, active.usage.prefilled_tokens = len(active.job.prompt_ids), 0
        if not seq.prefilling and seq.tokens:
            # The last sampled token was never fed: the cache holds the prompt and the tokens before it.
            self._remember([*active.job.prompt_ids, *seq.tokens[:-1]], seq.cache, active.state, priority=0)
        reason = "stop" if active.matched is not None else seq.finish_reason
        self._finish(active, reason)

    # ---- the scripted test seam ----------------------------------------------------------------------

    def _serve_scripted(self, job: Job) -> None:
        active = _Active(job)
        with self._lock:
            self._active.append(active)
        try:
            active.usage.prefilled_tokens = len(job.prompt_ids)
            pieces = list(self._scripted(job))[: job.max_tokens]
            reason = "stop"
            for n, text in enumerate(pieces, 1):
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                last = n == len(pieces)
                end = ("length" if n == job.max_tokens else "stop") if last else None
                if active.token(-1, text, end, 0.0, None):
                    break
                reason = end or reason
        except Exception as e:
            log.exception("generation failed for %s", job.label or "a request")
            self._fail(active, f"generation failed: {type(e).__name__}: {e}")
            return
        finally:
            with self._lock:
                self._active.remove(active)
        self._finish(active, "stop" if active.matched is not None else reason)

    # ---- endings and records -------------------------------------------------------------------------

    def _fail(self, active: _Active, message: str, status: int = 500) -> None:
        active.job.events.put(Failed(message, status))
        self._record(active.job, "error", active.usage)

    def _finish(self, active: _Active, reason: str) -> None:
        if active.matched is None and (rest := active.stopper.flush()):
            active.job.events.put(Piece(rest, active.logprobs))
        active.job.events.put(Finished(reason, active.matched, active.usage, list(active.token_ids)))
        self._record(active.job, reason, active.usage)

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
            self._totals["requests"] += job.prefill_from is None  # the n choices of one request count once
            self._totals["sequences"] += 1  # every answer generated (cancelled/failed count these)
            self._totals["cancelled"] += reason == "cancelled"
            self._totals["failed"] += reason == "error"
            for key in ("prompt_tokens", "cached_tokens", "prefilled_tokens", "completion_tokens"):
                self._totals[key] += record[key]
            self._engine_stats = engine_stats

    def _remember(
        self, ids: list[int], cache: list, base: ModelState | None, priority: int
    ) -> ModelState | None:
        """Snapshots the cache (which has seen ``ids``); returns the state later snapshots build on."""
        if self.prefix_cache.max_bytes <= 0 or ids in self.prefix_cache:
            return base
        state, own_bytes = capture_state(cache, base)
        stored = self.prefix_cache.store(ids, state, own_bytes, state.segments, priority)
        return state if stored else base


class _LogprobSampler:
    """Wraps a sampler: also keeps the sampled token's log-probability and the ``top`` most likely tokens
    on ``last`` (one log-softmax and one partial sort over the vocabulary per token)."""

    def __init__(self, sampler, top: int, tokenizer):
        self.sampler, self.top, self.tokenizer = sampler, top, tokenizer
        self.last: TokenLogprob | None = None

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
        self.last = TokenLogprob(self.tokenizer.token_bytes(token), chosen, top)
        return token


def release_mlx_thread_state() -> None:
    """Drops the calling thread's MLX state (its random key, streams, compile cache) while the GIL is held.

    Call it last on any non-main thread that ran MLX. Otherwise MLX's thread_local random key is freed
    by a C++ destructor after the thread's Python part ended (``Thread.join`` has already returned);
    that destructor takes the GIL, and if the main thread is finalizing the interpreter meanwhile,
    taking the GIL calls pthread_exit inside a noexcept destructor: "terminate called without an
    active exception" and SIGABRT (Ctrl-C on `streamer serve`). With the key dropped it does nothing.
    """
    mx.clear_streams()
