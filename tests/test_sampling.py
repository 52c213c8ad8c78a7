"""Sampling at the edges and statistically, against hand-computed distributions."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.sampling import SamplingParams, filter_logits, make_sampler

LOGITS = mx.array([1.0, 3.0, 2.0, 0.5, -1.0])
PROBS = np.exp(np.array(LOGITS)) / np.exp(np.array(LOGITS)).sum()


def test_temperature_zero_and_top_k_one_are_greedy():
    assert make_sampler(SamplingParams(0.0))(LOGITS) == 1
    assert make_sampler(SamplingParams(1.5, top_k=1, seed=0))(LOGITS) == 1


def test_tiny_top_p_keeps_only_the_most_likely_token():
    sample = make_sampler(SamplingParams(1.0, top_p=1e-6, seed=0))
    assert {sample(LOGITS) for _ in range(50)} == {1}


def test_filters_match_hand_computed_sets():
    def kept(params):
        return set(np.flatnonzero(np.isfinite(np.array(filter_logits(LOGITS, params)))))

    assert kept(SamplingParams(1.0, top_k=2)) == {1, 2}
    # Sorted probs: 0.61, 0.22, 0.08, 0.05, 0.01 -> top_p 0.8 needs the first two (0.61 < 0.8 <= 0.83).
    assert kept(SamplingParams(1.0, top_p=0.8)) == {1, 2}
    assert kept(SamplingParams(1.0, top_p=0.9)) == {0, 1, 2}
    # min_p 0.3: keep p >= 0.3 * 0.61 = 0.18.
    assert kept(SamplingParams(1.0, min_p=0.3)) == {1, 2}


def test_seed_reproduces_and_differs():
    def run(seed):
        s = make_sampler(SamplingParams(1.0, seed=seed))
        return [s(LOGITS) for _ in range(30)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_frequencies_follow_softmax_of_logits_over_temperature():
    n = 4000
    for temp in (1.0, 0.5):
        s = make_sampler(SamplingParams(temp, seed=0))
        counts = Counter(s(LOGITS) for _ in range(n))
        p = np.exp(np.array(LOGITS) / temp)
        p /= p.sum()
        observed = np.array([counts[i] for i in range(len(p))]) / n
        # 4 standard errors: fails on a wrong temperature or distribution, not on noise.
        tolerance = 4 * np.sqrt(p * (1 - p) / n) + 1e-3
        assert (np.abs(observed - p) <= tolerance).all(), (temp, observed, p)


def test_top_k_renormalises_over_kept_tokens():
    n = 3000
    s = make_sampler(SamplingParams(1.0, top_k=2, seed=5))
    counts = Counter(s(LOGITS) for _ in range(n))
    assert set(counts) == {1, 2}
    p1 = PROBS[1] / (PROBS[1] + PROBS[2])
    assert abs(counts[1] / n - p1) < 4 * np.sqrt(p1 * (1 - p1) / n)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.0}]
)
def test_invalid_params_raise_clear_errors(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)
