"""A multi-turn conversation over one engine that keeps the model state between turns.

Each turn renders the whole conversation with the checkpoint's chat template and tokenizes it; only the
tokens after the longest prefix whose state is at hand are run through the model:

* the cache itself, when the ids it holds are a prefix of the new rendering (templates that keep
  earlier answers verbatim);
* else the longest snapshot in the session's prefix cache, taken at message boundaries (the end of each
  user message): Qwen3.5's template drops earlier thinking, so the previous answer is re-read from there;
* else nothing: the conversation is prefilled from the start (e.g. after the system prompt changed).

A DeltaNet state cannot be rewound like a KV cache, hence the snapshots. They live in a ``PrefixCache``,
the same mechanism (and code) the server uses to resume conversations across requests. The session
object is plain Python (no click, no terminal): the CLI in ``cli/chat.py`` drives it, and so can tests or
other front ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.errors import CheckpointError, ConfigError
from streamer.generation.generate import PREFILL_CHUNK, prefill, stream_generate
from streamer.generation.prefix_cache import ModelState, PrefixCache, capture_state, restore_state
from streamer.generation.sampling import SamplingParams, TokenSampler, default_sampling_params, make_sampler
from streamer.loader import Engine
from streamer.models.layer_cache import KVCache, KVSnapshot, restore_caches, snapshot_caches
from streamer.storage.session import SessionError, SessionState, check_compatible, dtype_name, model_identity

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 8192
# Message-boundary snapshots a chat keeps (KV shared between them, counted once).
CHAT_SNAPSHOT_BYTES = 2 * 10**9
CHAT_SNAPSHOTS = 8
_EXPERT_KEYS = ("cache_hits", "cache_misses", "bytes_read")


class _Stopped(Exception):
    """Raised between prefill chunks when ``ChatSession.stop`` was called."""


@dataclass
class ChatChunk:
    """A piece of the answer as it streams: ``kind`` is "thinking" or "answer"."""

    kind: str
    text: str


@dataclass
class TurnStats:
    """What one turn cost: tokens, seconds and expert-cache traffic."""

    prompt_tokens: int = 0  # the whole rendered conversation
    prefilled_tokens: int = 0  # of them, run through the model this turn (the rest was cached)
    reused: str = "none"  # "cache", "snapshot" or "none": where the cached prefix came from
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "interrupted"
    token_ids: list[int] = field(default_factory=list)
    expert: dict = field(default_factory=dict)  # cache_hits / cache_misses / bytes_read during the turn

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / max(self.decode_s, 1e-9)


class _Reply:
    """Splits generated ids into thinking and answer and streams their text (special tokens hidden)."""

    def __init__(self, tokenizer, thinking: bool):
        self._tok = tokenizer
        self._think_end = tokenizer.token_id("</think>")
        self.kind = "thinking" if thinking and self._think_end is not None else "answer"
        self.ids: dict[str, list[int]] = {"thinking": [], "answer": []}
        self._detok = tokenizer.detokenizer(skip_special_tokens=True)
        self._answer_began = False

    def add(self, token: int) -> list[ChatChunk]:
        if token in self._tok.eos_token_ids:
            return []
        if self.kind == "thinking" and token == self._think_end:
            chunks = self._chunk(self._detok.finalize())
            self.kind, self._detok = "answer", self._tok.detokenizer(skip_special_tokens=True)
            return chunks
        self.ids[self.kind].append(token)
        return self._chunk(self._detok.add(token))

    def finish(self) -> list[ChatChunk]:
        return self._chunk(self._detok.finalize())

    def _chunk(self, text: str) -> list[ChatChunk]:
        if self.kind == "answer" and not self._answer_began:
            text = text.lstrip("\n")  # the template drops the newlines after </think> too
            self._answer_began = bool(text)
        return [ChatChunk(self.kind, text)] if text else []

    def message(self) -> dict:
        decode = self._tok.decode
        return {
            "role": "assistant",
            "content": decode(self.ids["answer"], skip_special_tokens=True).strip(),
            "reasoning_content": decode(self.ids["thinking"], skip_special_tokens=True).strip(),
        }


class ChatSession:
    """A conversation with an engine: messages, the model state they left, sampling settings.

    Args:
        engine: the loaded model.
        params: sampling settings; None takes the defaults for the mode (``default_sampling_params``).
        system: an optional system prompt.
        enable_thinking: let the model think before answering (Qwen3.5's default mode).
        max_tokens: most tokens per answer, thinking included.
        sampler: a ready sampler (tests force tokens with it); built from ``params`` when None.
        prefill_progress: called with (tokens done, tokens to do) after each prefill chunk.
    """

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams | None = None,
        *,
        system: str | None = None,
        enable_thinking: bool = True,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: TokenSampler | None = None,
        prefill_progress: Callable[[int, int], None] | None = None,
    ):
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        if engine.tokenizer.chat_template is None:
            raise CheckpointError(
                f"{engine.path} has no chat template (chat_template.jinja or tokenizer_config.json), so it "
                "cannot chat; use `streamer generate --raw` for plain completion"
            )
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.enable_thinking = enable_thinking
        self.params = params or default_sampling_params(self.tokenizer.generation_config, enable_thinking)
        self.sampler = sampler or make_sampler(self.params)
        self.max_tokens = max_tokens
        self.prefill_progress = prefill_progress
        self.identity = model_identity(engine.path)
        self.turns: list[TurnStats] = []
        self._stop = threading.Event()
        self._system = system or None
        self._stats_at_start = self._expert_stats()
        self.reset()

    # ---- conversation state -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays) and the model state."""
        self.messages: list[dict] = [{"role": "system", "content": self._system}] if self._system else []
        self.cache = self.engine.model.make_cache()
        self.cached_ids: list[int] = []  # the tokens whose state ``cache`` holds
        self.snapshots = PrefixCache(CHAT_SNAPSHOT_BYTES, CHAT_SNAPSHOTS)
        self._last: ModelState | None = None  # the latest snapshot (what an interrupted call returns to)
        self._last_ids: list[int] = []

    def set_system(self, text: str | None) -> None:
        """Sets (or with None/"" removes) the system prompt; the history stays, the next turn re-reads it."""
        self._system = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self._system}] if self._system else []) + rest

    @property
    def system(self) -> str | None:
        return self._system

    def stop(self) -> None:
        """Asks the running turn to end after the current token (or prefill chunk); safe from signals."""
        self._stop.set()

    # ---- one turn -----------------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[ChatChunk]:
        """Adds a user message and streams the answer; ``self.turns[-1]`` holds the turn's stats after.

        Stopping (``stop``) or an exception mid-turn (KeyboardInterrupt) leaves the session consistent:
        the partial answer joins the history and the model state is one that matches its token ids.
        """
        if not text.strip():
            raise ConfigError("empty message")
        self._stop.clear()
        self.messages.append({"role": "user", "content": text})
        try:
            ids, boundary, thinks = self._render()
            self._check_context(len(ids))
        except BaseException:
            self.messages.pop()  # e.g. a template error: the conversation stays as it was
            raise
        turn = TurnStats(prompt_tokens=len(ids))
        self.turns.append(turn)
        before, start = self._expert_stats(), time.perf_counter()
        reply = _Reply(self.tokenizer, thinks)
        try:
            turn.reused = self._reuse(ids)
            turn.prefilled_tokens = len(ids) - len(self.cached_ids)
            self._prefill_to(ids, boundary if boundary is not None else len(ids) - 1)
            yield from self._decode(ids, reply, turn, start)
        except (_Stopped, GeneratorExit) as e:
            # Raised between chunks or at a yield: the state matches cached_ids, nothing to undo.
            turn.finish_reason = "interrupted"
            if isinstance(e, GeneratorExit):
                raise
        except BaseException:
            turn.finish_reason = "interrupted"
            self._recover()
            raise
        finally:
            if turn.finish_reason is None:  # the consumer closed the generator early
                turn.finish_reason = "interrupted"
            if not turn.generated_tokens:
                turn.prefill_s = time.perf_counter() - start
            self.messages.append(reply.message())
            turn.expert = {k: v - before.get(k, 0) for k, v in self._expert_stats().items()}

    def _check_context(self, prompt_tokens: int) -> None:
        context = self.engine.args.max_position_embeddings
        if prompt_tokens >= context:
            raise ConfigError(
                f"the conversation is {prompt_tokens} tokens, the model's context is {context}: "
                "/reset to start a new one (or send a shorter message)"
            )

    def _decode(self, ids: list[int], reply: _Reply, turn: TurnStats, start: float) -> Iterator[ChatChunk]:
        self.sampler.reset_context(ids)
        rest = ids[len(self.cached_ids) :]
        budget = min(self.max_tokens, self.engine.args.max_position_embeddings - len(ids))  # context's end
        model, tok = self.engine.model, self.tokenizer
        stream = stream_generate(model, tok, rest, self.sampler, budget, cache=self.cache)
        decode_start = None
        try:
            for r in stream:
                if decode_start is None:
                    decode_start = time.perf_counter()
                    turn.prefill_s = decode_start - start
                turn.token_ids.append(r.token)
                turn.generated_tokens += 1
                turn.decode_s = time.perf_counter() - decode_start
                chunks = reply.add(r.token)
                if r.finish_reason or self._stop.is_set():
                    chunks += reply.finish()
                    turn.finish_reason = r.finish_reason or "interrupted"
                # Every yielded token but the last has been fed to the model.
                self.cached_ids = ids + turn.token_ids[:-1]
                yield from chunks
                if turn.finish_reason:
                    break
        finally:
            stream.close()

    def _render(self) -> tuple[list[int], int | None, bool]:
        """The conversation's token ids with the generation prompt, where the last user message ends in
        them (None if the generation prompt changed how the head tokenizes), and whether the generation
        prompt opens a think block."""
        tok = self.tokenizer
        text = tok.apply_chat_template(
            self.messages, add_generation_prompt=True, enable_thinking=self.enable_thinking
        )
        head_text = tok.apply_chat_template(self.messages, add_generation_prompt=False)
        ids, head = tok.encode(text), tok.encode(head_text)
        gen_prompt = text[len(head_text) :] if text.startswith(head_text) else ""
        thinks = "<think>" in gen_prompt and "</think>" not in gen_prompt
        boundary = len(head) if len(head) < len(ids) and ids[: len(head)] == head else None
        return ids, boundary, thinks

    def _reuse(self, ids: list[int]) -> str:
        """Brings the model state to the longest usable prefix of ``ids``; says where it came from."""

        def is_prefix(p: list[int]) -> bool:
            return 0 < len(p) < len(ids) and ids[: len(p)] == p

        if is_prefix(self.cached_ids):
            return "cache"
        had = len(self.cached_ids)
        if (hit := self.snapshots.lookup(ids)) is not None:
            self._go_back_to(list(hit.ids), hit.state)
            log.info(
                "the conversation re-renders differently after the cached tokens (the template drops "
                "earlier thinking): continuing from the last message boundary at token %d, %d to prefill",
                len(self.cached_ids),
                len(ids) - len(self.cached_ids),
            )
            return "snapshot"
        self.cache, self.cached_ids = self.engine.model.make_cache(), []
        if had:
            log.info("the conversation changed before any cached point: prefilling all %d tokens", len(ids))
        return "none"

    def _prefill_to(self, ids: list[int], end: int) -> None:
        """Prefills ``ids[len(cached_ids):end]`` chunk by chunk, then snapshots the state at ``end``."""
        start = len(self.cached_ids)
        todo = end - start  # (the few generation-prompt tokens after ``end`` go with the first decode)
        for pos in range(start, end, PREFILL_CHUNK):
            piece = ids[pos : min(pos + PREFILL_CHUNK, end)]
            prefill(self.engine.model, piece, self.cache, chunk=PREFILL_CHUNK)
            mx.eval(_state_arrays(self.cache))
            self.cached_ids = ids[: pos + len(piece)]
            if self.prefill_progress:
                self.prefill_progress(len(self.cached_ids) - start, todo)
            if self._stop.is_set():
                raise _Stopped
        if end > start:
            self._remember(ids[:end])

    def _remember(self, ids: list[int]) -> None:
        """Snapshots the cache (which holds ``ids``) into the prefix cache, sharing the KV positions it has
        in common with the previous snapshot."""
        n = len(self._last_ids)
        base = self._last if self._last is not None and n <= len(ids) and ids[:n] == self._last_ids else None
        state, own_bytes = capture_state(self.cache, base)
        self.snapshots.store(ids, state, own_bytes, state.segments)
        self._last, self._last_ids = state, list(ids)

    def _go_back_to(self, ids: list[int], state: ModelState) -> None:
        self.cache = self.engine.model.make_cache()
        restore_state(self.cache, state)
        self.cached_ids = list(ids)
        self._last, self._last_ids = state, list(ids)

    def _recover(self) -> None:
        """After an exception mid-model-call the state is unknown: go back to the last snapshot."""
        if self._last is not None:
            self._go_back_to(self._last_ids, self._last)
        else:
            self.cache, self.cached_ids = self.engine.model.make_cache(), []

    # ---- telemetry ----------------------------------------------------------------------------------

    def _expert_stats(self) -> dict:
        stats = self.engine.stats()
        return {k: stats[k] for k in _EXPERT_KEYS if k in stats}

    def totals(self) -> dict:
        """Cumulative numbers over this session's turns, and the expert cache since it started."""
        stats = self.engine.stats()
        now = {k: stats[k] for k in _EXPERT_KEYS if k in stats}
        expert = {k: v - self._stats_at_start.get(k, 0) for k, v in now.items()}
        return {
            "turns": len(self.turns),
            "prefilled_tokens": sum(t.prefilled_tokens for t in self.turns),
            "generated_tokens": sum(t.generated_tokens for t in self.turns),
            "prefill_s": sum(t.prefill_s for t in self.turns),
            "decode_s": sum(t.decode_s for t in self.turns),
            "expert": expert,
            "cache_bytes": stats.get("cache_bytes"),
            "ranks": stats.get("ranks", []),  # a pipeline across ranks: each one's totals since it started
        }

    # ---- sessions on disk ---------------------------------------------------------------------------

    def export_state(self) -> SessionState:
        """The conversation and model state, for ``session.write_session``.

        Raises:
            SessionError: the model runs as a pipeline across ranks (their layers' state stays there).
        """
        self._check_one_process()
        boundary = None
        if self._last is not None:
            cache = self.engine.model.make_cache()
            restore_state(cache, self._last)
            boundary = snapshot_caches(cache)
        return SessionState(
            model=self.identity,
            dtype=dtype_name(self.engine.model.dtype),
            messages=[dict(m) for m in self.messages],
            token_ids=list(self.cached_ids),
            caches=snapshot_caches(self.cache),
            boundary_tokens=len(self._last_ids) if boundary is not None else None,
            boundary=boundary,
            enable_thinking=self.enable_thinking,
        )

    def _check_one_process(self) -> None:
        if _spans_processes(self.cache):
            raise SessionError(
                "sessions are saved and loaded on one process: here the model runs as a pipeline across "
                "ranks, which keep their layers' state; run chat without mlx.launch to use sessions"
            )

    def import_state(self, state: SessionState, source: str = "the session") -> None:
        """Continues the conversation ``state`` holds (made by ``export_state``, perhaps in another run).

        Raises:
            SessionError: the state belongs to another model or dtype, or does not fit this model.
        """
        self._check_one_process()
        check_compatible(state, self.identity, dtype_name(self.engine.model.dtype), source)
        cache = self.engine.model.make_cache()
        if len(state.caches) != len(cache) or any(
            isinstance(c, KVCache) != isinstance(s, KVSnapshot)
            for c, s in zip(cache, state.caches, strict=False)
        ):
            raise SessionError(f"{source}: its layers do not match this model's ({len(cache)} layers)")
        restore_caches(cache, state.caches)
        self.cache, self.cached_ids = cache, list(state.token_ids)
        self.messages = [dict(m) for m in state.messages]
        self._system = next((m["content"] for m in self.messages if m["role"] == "system"), None)
        self.snapshots = PrefixCache(CHAT_SNAPSHOT_BYTES, CHAT_SNAPSHOTS)
        self._last, self._last_ids = None, []
        if state.boundary is not None and state.boundary_tokens:
            live = self.cache
            self.cache = self.engine.model.make_cache()
            restore_caches(self.cache, state.boundary)
            self._remember(state.token_ids[: state.boundary_tokens])
            self.cache = live


def _spans_processes(cache: list) -> bool:
    return hasattr(cache, "snapshot_remote")  # distributed.pipeline.StageCache


def _state_arrays(cache: list) -> list[mx.array]:
    arrays = []
    for c in cache:
        for name in ("keys", "values", "conv_state", "recurrent_state"):
            a = getattr(c, name, None)
            if a is not None:
                arrays.append(a)
    return arrays
