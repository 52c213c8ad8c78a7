"""Prefill and the token stream of one sequence, shared by the CLI, the server and benchmarks.

The model is any callable ``model(tokens [1, L], cache) -> logits [1, L, V]`` with ``make_cache()``;
whether its experts are resident or streamed does not matter here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from streamer.generation.sampling import Sampler
from streamer.generation.scheduler import PREFILL_CHUNK, GenSequence, Scheduler


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


def token_text(detok, token: int, reason: str | None) -> str:
    """The text a sampled token adds: none for the end-of-sequence id ("stop"), and whatever the
    detokenizer still holds when the sequence ends."""
    text = "" if reason == "stop" else detok.add(token)
    return text + detok.finalize() if reason else text


def stream_generate(
    model,
    tokenizer,
    prompt: Sequence[int],
    sampler: Sampler,
    max_tokens: int,
    cache: list | None = None,
    stats: Callable[[], dict] | None = None,
    prefill_progress: Callable[[int, int], None] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[GenerationResponse]:
    """Yields one GenerationResponse per generated token until EOS or ``max_tokens``: a batch of one on
    the scheduler.

    ``cache`` may hold the state of earlier turns: then ``prompt`` is only the new tokens. When the
    consumer stops early, the cache holds the prompt and every yielded token but the last.
    """
    cache = model.make_cache() if cache is None else cache
    detok = tokenizer.detokenizer()
    out: list[GenerationResponse] = []

    def on_token(seq: GenSequence, token: int, reason: str | None) -> None:
        out.append(
            GenerationResponse(
                token=token,
                text=token_text(detok, token, reason),
                prompt_tokens=len(seq.prompt),
                prompt_tps=len(seq.prompt) / max(seq.prompt_seconds, 1e-9),
                generation_tokens=len(seq.tokens),
                generation_tps=seq.generation_tps(),
                finish_reason=reason,
                stats=stats() if stats else {},
            )
        )

    progress = (lambda seq, done, total: prefill_progress(done, total)) if prefill_progress else None
    seq = GenSequence(
        list(prompt), sampler, max_tokens, cache, frozenset(tokenizer.eos_token_ids),
        on_token=on_token, on_prefill=progress,
    )  # fmt: skip
    scheduler = Scheduler(model, max_batch=1, prefill_chunk=prefill_chunk)
    scheduler.add(seq)
    try:
        while not seq.done:
            scheduler.step()
            if seq.error is not None:
                raise seq.error
            yield from out
            out.clear()
    finally:
        scheduler.settle()  # a consumer that stops early gets the cache its tokens left, nothing more
