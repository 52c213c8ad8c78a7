"""The one place a decode step is written: a scheduler that generates for many sequences together.

Every front end runs on it: ``stream_generate`` (chat, generate, bench) is a batch of one, and the
server's worker keeps one scheduler for all its requests. Sequences join at step boundaries and leave
when they finish, are stopped by their consumer or are cancelled. One ``step()``:

1. admits waiting sequences while the batch has room (``max_batch``) and their state fits the memory
   budget (``max_state_bytes``: each sequence reserves its KV cache at its longest and its DeltaNet state);
2. runs the next prefill pieces of the sequences still reading their prompts, at most ``prefill_chunk``
   tokens in all (the oldest first; several short prompts go end to end in one model call, see
   ``models.layer_cache.RaggedBatch``), so a long prompt delays the running streams by one chunk per
   step, not by all of it, and a burst of short requests is read in one call;
3. runs one decode step of every sequence that has a sampled token to feed, as one model call on
   [B, 1] tokens: the resident weights are read once for B tokens and each layer's expert step acquires
   the union of the batch's routed experts once. Attention runs row by row over each sequence's own
   KV cache, so each row computes exactly what it would alone (see ``models.layer_cache.KVBatch``).

A prompt is always cut into the same pieces, alone or in company, each piece's attention and DeltaNet
run over that sequence's own state, and a batch of one runs with the plain per-sequence caches: the path
of a single request is the same code it always was.

Consumers hear about a sequence through callbacks, all called on the thread that calls ``step()``:
``on_token`` for each sampled token, ``on_boundary`` when the cache holds a requested prompt prefix
(e.g. to snapshot it), ``on_prefill`` after each prefill chunk, ``on_finish`` once at the end.

Names: B = sequences in a decode step, V = vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.generation.sampling import Sampler, TokenSampler
from streamer.models.layer_cache import batch_caches, ragged_caches, restore_caches, snapshot_caches

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512
DEFAULT_MAX_BATCH = 8


@dataclass(eq=False)
class GenSequence:
    """One sequence to generate: its prompt, sampler, limits, layer caches and callbacks.

    Args:
        prompt: the token ids to run through the model (after whatever state ``cache`` already holds).
        sampler: picks each token from float32 logits [V].
        max_tokens: the most tokens to sample (the finish reason is "length" when reached).
        cache: the sequence's own layer caches (``model.make_cache()``, perhaps restored from a snapshot).
        eos_ids: sampled ids that end the sequence with "stop" (they are reported, never fed).
        boundaries: prompt lengths after which the prefill pauses and ``on_boundary(n)`` runs.
        reserve_tokens: the longest the cache gets (for the memory budget); default: cached + prompt +
            max_tokens.
    """

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    cache: list
    eos_ids: frozenset[int] = frozenset()
    boundaries: Sequence[int] = ()
    on_token: Callable[[GenSequence, int, str | None], None] | None = None  # (seq, id, finish reason or None)
    on_boundary: Callable[[GenSequence, int], None] | None = None
    on_prefill: Callable[[GenSequence, int, int], None] | None = None
    on_finish: Callable[[GenSequence], None] | None = None
    reserve_tokens: int | None = None
    label: str = ""
    # Another sequence with the same prompt and the same starting state (another choice of one request):
    # this one skips its own prefill and adopts that one's state and last logits when its prefill ends.
    follows: GenSequence | None = None

    # Progress, written by the scheduler.
    fed: int = 0  # prompt tokens run through the model
    tokens: list[int] = field(default_factory=list)  # sampled ids
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error" or what ``stop()`` said
    error: BaseException | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    adopted: bool = False  # the prompt's state came from the sequence it followed (no prefill of its own)
    _stop_reason: str | None = None
    _logits: mx.array | None = None  # the prompt's last logits, until the first token is sampled

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def stop(self, reason: str = "stop") -> None:
        """Ends the sequence at the next step boundary (a stop string, a client that left); thread-safe."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def cancel(self) -> None:
        self.stop("cancelled")

    @property
    def prompt_seconds(self) -> float:
        if self.admitted_at is None or self.first_token_at is None:
            return 0.0
        return self.first_token_at - self.admitted_at

    def generation_tps(self, now: float | None = None) -> float:
        if self.first_token_at is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return len(self.tokens) / max(now - self.first_token_at, 1e-9)


class MemoryBudgetError(ValueError):
    """A sequence whose state alone is larger than the scheduler's memory budget."""


class Scheduler:
    """Runs the sequences added to it, a step at a time (see the module docstring).

    Args:
        model: ``model(tokens [B, L], cache, last_only) -> logits`` with ``state_bytes(tokens)``.
        max_batch: the most sequences admitted at once (prefilling or decoding).
        prefill_chunk: the most prompt tokens one prefill call runs.
        max_state_bytes: the KV + DeltaNet bytes the admitted sequences may reserve together; None = no limit.
        pipeline: build the next decode step while the current one computes, when that is safe (greedy
            rows, a lazy model, no one joining): the tokens are the same, the Python work overlaps.
    """

    def __init__(
        self,
        model,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = PREFILL_CHUNK,
        max_state_bytes: int | None = None,
        pipeline: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_state_bytes = max_state_bytes
        self.waiting: deque[GenSequence] = deque()
        self.running: list[GenSequence] = []  # admitted, in admission order
        self._reserved: dict[int, int] = {}  # id(admitted sequence) -> its state bytes
        self.steps = self.decode_steps = self.decoded_tokens = 0
        self.pipeline = pipeline
        self.pipelined_steps = 0  # decode steps built while the previous one computed
        self._pending: _Step | None = None  # the next decode step, built ahead (see _decode)
        self.largest_batch = 0

    # ---- membership --------------------------------------------------------------------------------

    def add(self, seq: GenSequence) -> GenSequence:
        """Queues a sequence; it joins at the next step with room for it.

        Raises:
            MemoryBudgetError: its state alone would not fit ``max_state_bytes``.
        """
        if self.max_state_bytes is not None and (need := self.state_bytes(seq)) > self.max_state_bytes:
            raise MemoryBudgetError(
                f"this request needs {need / 2**20:.0f} MiB of model state (KV cache and DeltaNet) at its "
                f"longest, more than the {self.max_state_bytes / 2**20:.0f} MiB budget: shorten the prompt "
                "or max_tokens, or raise the budget"
            )
        if seq.follows is not None and (seq.follows.done or not seq.follows.prefilling):
            seq.follows = None  # its leader's prompt was read already: no adoption will come, read its own
        self.waiting.append(seq)
        return seq

    def state_bytes(self, seq: GenSequence) -> int:
        tokens = seq.reserve_tokens
        if tokens is None:
            tokens = _cached_tokens(seq.cache) + len(seq.prompt) + seq.max_tokens
        return self.model.state_bytes(tokens)

    @property
    def reserved_bytes(self) -> int:
        """The state bytes the admitted sequences reserve together."""
        return sum(self._reserved.values())

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ----------------------------------------------------------------------------------

    def step(self) -> None:
        """Admits, runs the next prefill pieces and one batched decode step; finished sequences leave."""
        self.steps += 1
        self._drop_stopped()
        self._admit()
        group = self._prefill_group()
        if group:
            self._guarded(group, self._prefill, group)
        ready = [s for s in self.running if not s.prefilling and not s.done and s._stop_reason is None]
        fresh = [s for s in ready if s._logits is not None]  # prefill just ended: first token from its logits
        for seq in fresh:
            self._guarded([seq], self._sample_first, seq)
        decoding = [s for s in ready if s not in fresh and not s.done]
        if decoding:
            self._guarded(decoding, self._decode, decoding)
        self._drop_stopped()

    def run_until_done(self) -> None:
        while self.busy:
            self.step()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq._stop_reason is not None:
                self.waiting.popleft()
                self._finish(seq, seq._stop_reason)
                continue
            need = self.state_bytes(seq) if self.max_state_bytes is not None else 0
            if self.running and need and self.reserved_bytes + need > self.max_state_bytes:
                break  # waits for a running sequence to leave
            self.waiting.popleft()
            self.running.append(seq)
            self._reserved[id(seq)] = need
            seq.admitted_at = time.perf_counter()

    def _drop_stopped(self) -> None:
        for seq in list(self.running):
            if not seq.done and seq._stop_reason is not None:
                self._finish(seq, seq._stop_reason)
        for seq in [s for s in self.waiting if s._stop_reason is not None]:
            self.waiting.remove(seq)
            self._finish(seq, seq._stop_reason)

    def _finish(self, seq: GenSequence, reason: str, error: BaseException | None = None) -> None:
        if seq.done:
            return
        seq.finish_reason, seq.error, seq._logits = reason, error, None
        if self._pending is not None:  # a step built ahead for it must not count: its caches go back
            self._pending.rewind(seq)
        for follower in self._followers(seq):  # it left before its prompt was read: they read their own
            follower.follows = None
        if seq in self.running:
            self.running.remove(seq)
            self._reserved.pop(id(seq), None)
        if seq.on_finish:
            seq.on_finish(seq)

    def _guarded(self, seqs: list[GenSequence], work: Callable, *args) -> None:
        """Runs ``work``; an Exception fails ``seqs`` (their state is unknown now), the rest go on.

        A BaseException (KeyboardInterrupt) is not the sequences' fault: it propagates as it is.
        """
        try:
            work(*args)
        except Exception as e:
            log.debug("step failed for %d sequence(s): %s", len(seqs), e)
            for seq in seqs:
                self._finish(seq, "error", e)

    # ---- the model calls ---------------------------------------------------------------------------

    def _piece_end(self, seq: GenSequence) -> int:
        """Where the sequence's next prefill piece ends: a chunk on, or its next boundary, or its prompt's
        end. It depends on the sequence alone, so a prompt is split the same way alone or in company."""
        end = min(len(seq.prompt), seq.fed + self.prefill_chunk)
        return min([b for b in seq.boundaries if seq.fed < b < end] + [end])

    def _prefill_group(self) -> list[GenSequence]:
        """The prefilling sequences whose next pieces run this step: the oldest, then the next ones in
        admission order while the pieces total at most ``prefill_chunk`` tokens."""
        group, total = [], 0
        for seq in self.running:
            if not seq.prefilling or seq.done or seq._stop_reason is not None or seq.follows is not None:
                continue
            n = self._piece_end(seq) - seq.fed
            if group and total + n > self.prefill_chunk:
                break
            group.append(seq)
            total += n
        return group

    def _prefill(self, group: list[GenSequence]) -> None:
        """One model call over the group's next pieces (end to end when several: ``ragged_caches``)."""
        ends = [self._piece_end(seq) for seq in group]
        pieces = [seq.prompt[seq.fed : end] for seq, end in zip(group, ends, strict=True)]
        if len(group) == 1:
            cache = group[0].cache
        else:
            cache = ragged_caches([seq.cache for seq in group], [len(p) for p in pieces])
        tokens = mx.array([t for piece in pieces for t in piece])[None]
        logits = self.model(tokens, cache=cache, last_only=True)[0]  # [G, V]: each piece's last position
        mx.eval(logits, [c.state for seq in group for c in seq.cache])
        for i, (seq, end) in enumerate(zip(group, ends, strict=True)):
            seq.fed = end
            if seq.on_prefill:
                seq.on_prefill(seq, seq.fed, len(seq.prompt))
            if seq.on_boundary and end in seq.boundaries:
                seq.on_boundary(seq, end)
            if not seq.prefilling:
                seq._logits = logits[i]
                for follower in self._followers(seq):
                    _adopt(follower, seq, logits[i])

    def _followers(self, leader: GenSequence) -> list[GenSequence]:
        return [s for s in (*self.running, *self.waiting) if s.follows is leader and not s.done]

    def _sample_first(self, seq: GenSequence) -> None:
        logits, seq._logits = seq._logits, None
        seq.first_token_at = time.perf_counter()
        self._sample(seq, logits)

    def _decode(self, seqs: list[GenSequence]) -> None:
        step = self._pending
        self._pending = None
        if step is None or [s for s in step.seqs if s is not None] != seqs:
            if step is not None:  # the batch changed since it was launched: undo it, run the batch anew
                step.rewind_all()
            step = self._launch(seqs, mx.array([[s.tokens[-1]] for s in seqs]))
            mx.async_eval(step.outputs)
        rows = [i for i, s in enumerate(step.seqs) if s is not None]
        if step.argmax is not None and self._may_pipeline(seqs):
            # Build the next step on this one's (lazy) greedy ids while this one computes, as mlx-lm's
            # generate_step does; undone row by row for sequences that end here (``_finish``).
            self._pending = self._launch(seqs, step.argmax[mx.array(rows)][:, None])
            mx.async_eval(self._pending.outputs)
            self.pipelined_steps += 1
        mx.eval(step.outputs)
        logits = step.logits[mx.array(rows)] if len(rows) < len(step.seqs) else step.logits
        ids = step.argmax.tolist() if step.argmax is not None else None
        self.decode_steps += 1
        self.decoded_tokens += len(seqs)
        self.largest_batch = max(self.largest_batch, len(seqs))
        for i, seq in enumerate(seqs):
            if ids is not None and _plain(seq):
                seq.sampler.accept(ids[rows[i]])
                self._guarded([seq], self._take, seq, ids[rows[i]])
            else:
                self._guarded([seq], self._sample, seq, logits[i])

    def _launch(self, seqs: list[GenSequence], tokens: mx.array) -> _Step:
        """The graph of one decode step over ``seqs`` (not evaluated), and how to undo it per row."""
        undo = [[dict(vars(c)) for c in s.cache] for s in seqs]  # each layer cache's attributes, as before
        cache = seqs[0].cache if len(seqs) == 1 else batch_caches([s.cache for s in seqs])
        logits = self.model(tokens, cache=cache)[:, -1, :]  # [B, V]
        # Greedy rows without penalties take their ids from one argmax over the batch, evaluated with the
        # logits: one host sync per step (the same ids the samplers would pick row by row).
        argmax = mx.argmax(logits, axis=-1) if any(_plain(s) for s in seqs) else None
        return _Step(list(seqs), logits, argmax, undo)

    def _may_pipeline(self, seqs: list[GenSequence]) -> bool:
        """Whether to build the next step now: every row greedy with a lazy model, nobody about to join
        (the next step's batch is this one's), and at least one row that does not end at its length."""
        return (
            self.pipeline
            and all(_plain(s) and s._stop_reason is None for s in seqs)
            and len(self.running) == len(seqs)
            and not self.waiting
            and any(len(s.tokens) + 1 < s.max_tokens for s in seqs)
            and getattr(self.model, "decode_is_lazy", lambda: False)()
        )

    def settle(self) -> None:
        """Undoes a next step that was built ahead, so every cache holds exactly its sequence's fed tokens
        (call it before using the caches elsewhere, e.g. when a consumer stops early)."""
        if self._pending is not None:
            self._pending.rewind_all()
            self._pending = None

    def _sample(self, seq: GenSequence, logits: mx.array) -> None:
        self._take(seq, seq.sampler(logits.astype(mx.float32)))

    def _take(self, seq: GenSequence, token: int) -> None:
        seq.tokens.append(token)
        reason = "stop" if token in seq.eos_ids else ("length" if len(seq.tokens) >= seq.max_tokens else None)
        if seq.on_token:
            seq.on_token(seq, token, reason)
        if reason or seq._stop_reason is not None:
            self._finish(seq, reason or seq._stop_reason)


@dataclass(eq=False)
class _Step:
    """A decode step's graph: its rows (None once a row's sequence ended), outputs, and per-row undo."""

    seqs: list[GenSequence | None]
    logits: mx.array
    argmax: mx.array | None
    undo: list[list[dict]]

    @property
    def outputs(self) -> list[mx.array]:
        return [self.logits] + ([self.argmax] if self.argmax is not None else [])

    def rewind(self, seq: GenSequence) -> None:
        """Puts ``seq``'s layer caches back as they were before this step was built."""
        for i, s in enumerate(self.seqs):
            if s is seq:
                for c, saved in zip(seq.cache, self.undo[i], strict=True):
                    c.__dict__.update(saved)
                self.seqs[i] = None

    def rewind_all(self) -> None:
        for s in list(self.seqs):
            if s is not None:
                self.rewind(s)


def _plain(seq: GenSequence) -> bool:
    return isinstance(seq.sampler, TokenSampler) and seq.sampler.plain_greedy


def _adopt(follower: GenSequence, leader: GenSequence, logits: mx.array) -> None:
    """Gives ``follower`` the state ``leader`` has right after its prompt, and the prompt's last logits.

    The KV caches get their own copies; DeltaNet states are shared arrays, which is safe because a layer
    replaces them (never writes into them) at every step.
    """
    same_start = _cached_tokens(follower.cache) == _cached_tokens(leader.cache) - len(leader.prompt)
    if follower.prompt != leader.prompt or not same_start:
        follower.follows = None  # not the same request after all: it reads its own prompt
        return
    restore_caches(follower.cache, snapshot_caches(leader.cache))
    follower.fed, follower._logits = len(follower.prompt), logits
    follower.follows, follower.adopted = None, True
    if follower.on_prefill:
        follower.on_prefill(follower, follower.fed, len(follower.prompt))


def _cached_tokens(cache: list) -> int:
    return max((getattr(c, "offset", 0) for c in cache), default=0)
