"""Token sampling: penalties, then greedy or temperature with top-k / top-p / min-p, with an explicit seed.

A sampler takes float32 logits of one position ``[V]`` and returns one token id. It remembers the
most recent context tokens (prompt and generated) for the repetition and presence penalties, which work
as in llama.cpp and mlx-lm: over the last ``penalty_window`` tokens, each distinct token's logit is
divided by ``repetition_penalty`` when positive (multiplied when negative), then ``presence_penalty`` is
subtracted from it. Randomness comes from an ``mx.random`` key split per call, so a seed reproduces a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import mlx.core as mx

from streamer.errors import ConfigError

Sampler = Callable[[mx.array], int]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token seen in the window; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style divisor of seen tokens' logits; 1 = off
    penalty_window: int = 64  # most recent context tokens the penalties look at (llama.cpp's default)

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if not math.isfinite(self.presence_penalty):
            raise ConfigError(f"presence_penalty must be a finite number, got {self.presence_penalty}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.penalty_window < 1:
            raise ConfigError(f"penalty_window must be >= 1, got {self.penalty_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.repetition_penalty != 1


# Qwen3.5 model-card recommendations, used when the checkpoint's generation_config.json says nothing.
THINKING_DEFAULTS = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
NON_THINKING_DEFAULTS = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)

_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty")


def model_thinks_by_default(generation_config: dict) -> bool:
    """Whether answers start with thinking unless asked otherwise: generation_config.json's
    ``enable_thinking`` (a streamer extension; the demo model, which cannot think, sets it false), else yes
    (Qwen3.5 thinks by default)."""
    value = generation_config.get("enable_thinking", True)
    if not isinstance(value, bool):
        raise ConfigError(f"generation_config.json: enable_thinking must be true or false, got {value!r}")
    return value


def model_max_tokens(generation_config: dict, fallback: int) -> int:
    """The answer-length budget when the user sets none: generation_config.json's ``max_new_tokens``
    (Hugging Face's key; the demo model sets a few hundred), else ``fallback``."""
    value = generation_config.get("max_new_tokens")
    if value is None:
        return fallback
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"generation_config.json: max_new_tokens must be a positive integer, got {value!r}")
    return value


def default_sampling_params(generation_config: dict, thinking: bool) -> SamplingParams:
    """The sampling defaults for a checkpoint and mode.

    Thinking mode takes the checkpoint's ``generation_config.json`` values (Qwen ships its thinking-mode
    recommendation there; ``do_sample: false`` means greedy) over the model card's; non-thinking mode
    takes the model card's non-thinking values, which generation_config.json does not describe.
    """
    if not thinking:
        return NON_THINKING_DEFAULTS
    found = {k: generation_config[k] for k in _GENERATION_CONFIG_KEYS if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        found["temperature"] = 0.0
    try:
        return dataclasses.replace(THINKING_DEFAULTS, **found)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"generation_config.json: {e}") from None


class TokenSampler:
    """A ``Sampler`` that applies the penalties over the context it has seen, then picks a token.

    Every picked token joins the context; ``reset_context`` sets it to a prompt before a generation.
    """

    def __init__(self, params: SamplingParams, context: Iterable[int] = ()):
        self.params = params
        self._recent: deque[int] = deque(context, maxlen=params.penalty_window)
        seed = params.seed if params.seed is not None else _fresh_seed()
        self._key = None if params.greedy else mx.random.key(seed)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits (no penalties): a batch's rows can share one argmax call."""
        return self._key is None and not self.params.penalized

    def accept(self, token: int) -> None:
        """Records a token picked for this sampler elsewhere (a batch's shared argmax)."""
        self._recent.append(token)

    def reset_context(self, ids: Iterable[int]) -> None:
        self._recent.clear()
        self._recent.extend(ids)

    def __call__(self, logits: mx.array) -> int:
        logits = logits.astype(mx.float32)
        if self.params.penalized and self._recent:
            logits = apply_penalties(logits, self._recent, self.params)
        if self._key is None:
            token = int(mx.argmax(logits).item())
        else:
            logprobs = filter_logits(logits / self.params.temperature, self.params)
            self._key, sub = mx.random.split(self._key)
            token = int(mx.random.categorical(logprobs, key=sub).item())
        self._recent.append(token)
        return token


def make_sampler(params: SamplingParams, context: Iterable[int] = ()) -> TokenSampler:
    """A sampler for ``params``; temperature 0 (or top_k 1) is greedy argmax after the penalties.

    Args:
        params: the sampling settings.
        context: the prompt's ids (the penalties look at its last ``penalty_window`` tokens too).
    """
    return TokenSampler(params, context)


def apply_penalties(logits: mx.array, context: Iterable[int], params: SamplingParams) -> mx.array:
    """``logits`` [V] with the repetition and presence penalties applied once per distinct context token."""
    ids = mx.array(sorted(set(context)))
    seen = logits[ids]
    if params.repetition_penalty != 1:
        seen = mx.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    if params.presence_penalty:
        seen = seen - params.presence_penalty
    logits = mx.array(logits)  # a new array: the caller's stays as it was
    logits[ids] = seen
    return logits


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
