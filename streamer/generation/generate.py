"""Prefill, decode step and the token stream shared by the CLI, the server and benchmarks.

The model is any callable ``model(tokens [1, L], cache) -> logits [1, L, V]`` with ``make_cache()``;
whether its experts are resident or streamed does not matter here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.generation.sampling import Sampler

PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
    """One generated token and the running totals."""

    token: int
    text: str  # new text since the previous response (may be empty mid-character)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None  # "stop", "length" or None while generating
    stats: dict = field(default_factory=dict)


def prefill(
    model,
    tokens: Sequence[int],
    cache: list,
    chunk: int = PREFILL_CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Runs ``tokens`` through the model in chunks, filling ``cache``; returns the last position's logits."""
    if not tokens:
        raise ValueError("prefill needs at least one token")
    logits = None
    for start in range(0, len(tokens), chunk):
        piece = mx.array(tokens[start : start + chunk])[None]
        logits = model(piece, cache=cache, last_only=True)[:, -1, :]
        mx.eval(logits, [c.state for c in cache])
        if progress:
            progress(min(start + chunk, len(tokens)), len(tokens))
    return logits[0]


def stream_generate(
    model,
    tokenizer,
    prompt: Sequence[int],
    sampler: Sampler,
    max_tokens: int,
    cache: list | None = None,
    stats: Callable[[], dict] | None = None,
    prefill_progress: Callable[[int, int], None] | None = None,
) -> Iterator[GenerationResponse]:
    """Yields one GenerationResponse per generated token until EOS or ``max_tokens``.

    ``cache`` may hold the state of earlier turns: then ``prompt`` is only the new tokens.
    """
    cache = model.make_cache() if cache is None else cache
    detok = tokenizer.detokenizer()
    start = time.perf_counter()
    logits = prefill(model, prompt, cache, progress=prefill_progress)
    prompt_secs = time.perf_counter() - start
    prompt_tps = len(prompt) / max(prompt_secs, 1e-9)
    decode_start = time.perf_counter()
    for n in range(1, max_tokens + 1):
        token = sampler(logits.astype(mx.float32))
        done = token in tokenizer.eos_token_ids
        reason = "stop" if done else ("length" if n == max_tokens else None)
        text = "" if done else detok.add(token)
        if reason:
            text += detok.finalize()
        elapsed = time.perf_counter() - decode_start
        yield GenerationResponse(
            token=token,
            text=text,
            prompt_tokens=len(prompt),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(elapsed, 1e-9),
            finish_reason=reason,
            stats=stats() if stats else {},
        )
        if reason:
            return
        logits = model(mx.array([[token]]), cache=cache)[0, -1, :]
        mx.eval(logits)
