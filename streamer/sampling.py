"""Token sampling: greedy, temperature, top-k, top-p, min-p, with an explicit seed.

Every sampler takes float32 logits of one position ``[V]`` and returns one token id. Randomness comes
from an ``mx.random`` key split per call, so a seed reproduces a run exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .errors import ConfigError

Sampler = Callable[[mx.array], int]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler for ``params``; temperature 0 (or top_k 1) is greedy argmax."""
    if params.temperature == 0 or params.top_k == 1:
        return lambda logits: int(mx.argmax(logits).item())
    key = [mx.random.key(params.seed if params.seed is not None else _fresh_seed())]

    def sample(logits: mx.array) -> int:
        logprobs = filter_logits(logits.astype(mx.float32) / params.temperature, params)
        key[0], sub = mx.random.split(key[0])
        return int(mx.random.categorical(logprobs, key=sub).item())

    return sample


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities with tokens outside top-k / top-p / min-p set to -inf."""
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    neg_inf = mx.array(-float("inf"), dtype=logprobs.dtype)
    if params.top_k and params.top_k < logprobs.shape[-1]:
        kth = mx.sort(logprobs)[-params.top_k]
        logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
    if params.min_p > 0:
        threshold = mx.max(logprobs) + mx.log(mx.array(params.min_p))
        logprobs = mx.where(logprobs < threshold, neg_inf, logprobs)
    if params.top_p < 1:
        order = mx.argsort(-logprobs)
        sorted_probs = mx.exp(logprobs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        before = mx.cumsum(sorted_probs) - sorted_probs
        keep_sorted = before < params.top_p
        keep = keep_sorted[mx.argsort(order)]  # back to vocabulary order
        logprobs = mx.where(keep, logprobs, neg_inf)
    return logprobs


def _fresh_seed() -> int:
    import secrets

    return secrets.randbits(31)
