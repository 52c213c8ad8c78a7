"""REAP saliency measured while the engine runs, and the choice of experts to keep when pruning.

REAP (arXiv 2510.13999, "router-weighted expert activation pruning") scores expert j of a layer as
the mean, over the tokens routed to j, of g_j(x) · ‖f_j(x)‖₂: the gate weight the block multiplies the
expert's output by (after ``norm_topk_prob``'s renormalisation) times the L2 norm of that output. An
expert that is rarely chosen, or contributes little when it is, scores low and is pruned first.

``Saliency`` is a ``SparseMoeBlock`` observer (``install``): per layer it adds each (token, chosen
expert)'s g · ‖f‖ into a float64 sum and counts the routing, on the host, so memory is two arrays of E
numbers per layer whatever the text's length. It sees whatever runs the model: prefill and decode,
streamed or resident experts.

Names: E = experts of a layer, K = experts per token, N = tokens in a call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from streamer.errors import ConfigError
from streamer.storage.profile_file import REAP, ROUTED, Profile, ProfileError

METHODS = ("reap", "frequency", "random")


class Saliency:
    """Observer: per layer, sums of gate weight × ‖expert output‖₂ and routing counts per expert."""

    def __init__(self, num_experts: Sequence[int]):
        self.sums = [np.zeros(n, dtype=np.float64) for n in num_experts]
        self.counts = [np.zeros(n, dtype=np.int64) for n in num_experts]
        self.tokens = 0  # token positions seen at layer 0

    def __call__(self, layer: int, indices: mx.array, scores: mx.array, y: mx.array) -> None:
        norms = mx.sqrt(mx.sum(mx.square(y.astype(mx.float32)), axis=-1))  # [B, L, K]
        weighted = scores.astype(mx.float32) * norms
        mx.eval(indices, weighted)
        ids = np.array(indices).reshape(-1)  # [N*K]
        n = len(self.sums[layer])
        self.sums[layer] += np.bincount(ids, weights=np.array(weighted, np.float64).reshape(-1), minlength=n)
        self.counts[layer] += np.bincount(ids, minlength=n)
        if layer == 0:
            self.tokens += int(np.prod(indices.shape[:-1]))

    def scores(self, layer: int) -> np.ndarray:
        """REAP score of each expert of ``layer`` (0 for an expert no token was routed to)."""
        c = self.counts[layer]
        return np.divide(self.sums[layer], c, out=np.zeros_like(self.sums[layer]), where=c > 0)

    def install(self, model) -> None:
        """Observes every MoE block of ``model`` (a ``qwen3_5_moe.Model``)."""
        for i, layer in enumerate(model.layers):
            layer.mlp.set_observer(self, i)

    @staticmethod
    def remove(model) -> None:
        for layer in model.layers:
            layer.mlp.set_observer(None)

    def add_to(self, profile: Profile) -> None:
        """Folds this run into ``profile``'s ``reap`` arrays (means weighted by routing counts)."""
        for layer, (s, c) in enumerate(zip(self.sums, self.counts, strict=True)):
            arrays = profile.arrays[layer]
            old_mean = np.asarray(arrays.get(REAP, [0.0] * len(s)), dtype=np.float64)
            # The profile's routing counts before this run's are added: call before Counter.add_to.
            old_count = np.asarray(arrays[ROUTED], dtype=np.int64) if REAP in arrays else np.zeros_like(c)
            total = old_count + c
            summed = old_mean * old_count + s
            mean = np.divide(summed, total, out=np.zeros_like(summed), where=total > 0)
            arrays[REAP] = [float(v) for v in mean]


def keep_count(num_experts: int, top_k: int, keep: int | None, ratio: float | None) -> int:
    """How many experts per layer to keep: ``keep`` itself, or E minus ``ratio`` of E (rounded).

    Raises:
        ConfigError: neither or both given, or a count outside top-k .. E - 1.
    """
    if (keep is None) == (ratio is None):
        raise ConfigError("give one of --ratio R (share of experts to remove) or --keep N (experts to keep)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ConfigError(f"--ratio {ratio:g}: give the share of experts to remove, between 0 and 1")
        keep = num_experts - round(num_experts * ratio)
        flag = f"--ratio {ratio:g} keeps {keep} of {num_experts} experts"
    else:
        flag = f"--keep {keep}"
    if keep >= num_experts:
        raise ConfigError(f"{flag}: nothing to prune (the model has {num_experts} per layer); keep fewer")
    if keep < top_k:
        raise ConfigError(
            f"{flag}: a token routes to {top_k} experts (num_experts_per_tok), so keep at least {top_k}"
        )
    return keep


def choose_experts(
    profile: Profile | None, num_experts: Sequence[int], keep: int, by: str, seed: int = 0
) -> list[list[int]]:
    """Per layer, the ``keep`` experts with the highest score, in ascending id order (the router's order).

    ``by``: ``reap`` (the profile's REAP scores), ``frequency`` (its routing counts) or ``random`` (a
    seeded draw; no profile needed). Ties go to the lower expert id.

    Raises:
        ConfigError: an unknown method, or a method whose profile (or its ``reap`` arrays) is missing.
    """
    if by not in METHODS:
        raise ConfigError(f"--by {by}: choose one of {', '.join(METHODS)}")
    if by != "random" and profile is None:
        raise ConfigError(f"--by {by} needs a profile: run `streamer profile MODEL --text FILE --reap` first")
    kept = []
    for layer, n in enumerate(num_experts):
        if by == "random":
            score = np.random.default_rng([seed, layer]).permutation(n).astype(np.float64)
        else:
            arrays = profile.arrays[layer]
            name = REAP if by == "reap" else ROUTED
            if name not in arrays:
                raise ProfileError(
                    "the profile has no REAP scores; rewrite it with "
                    "`streamer profile MODEL --text FILE --reap`"
                )
            score = np.asarray(arrays[name], dtype=np.float64)
        order = np.lexsort((np.arange(n), -score))  # highest score first, then lower id
        kept.append(sorted(int(e) for e in order[:keep]))
    return kept


def prune_divergence(
    source: str | os.PathLike, pruned: str | os.PathLike, config, text: str, n_tokens: int, n_prompt: int
) -> dict:
    """How far the pruned model's next-token predictions are from the unpruned one's, teacher-forced on
    the first ``n_tokens`` of ``text`` (``divergence.compare``: top-1 agreement, KL, loss change).

    Each model is loaded fresh with ``config`` (one at a time) and given the same tokens.
    """
    from streamer.loader import load_engine
    from streamer.tuning.divergence import compare, teacher_forced, text_ids

    runs, ids = [], None
    for path in (source, pruned):
        with load_engine(path, config) as engine:
            ids = ids or text_ids(engine, text, n_tokens)
            runs.append(teacher_forced(engine, ids, n_prompt))
    return compare(*runs)
