"""Sampling at the edges and statistically, against hand-computed distributions."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.generation.sampling import (
    SamplingParams,
    apply_penalties,
    default_sampling_params,
    filter_logits,
    make_sampler,
)

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


# ---------------------------------------------------------------------------------------------------------
# Penalties (llama.cpp / mlx-lm semantics) and defaults


def test_penalties_match_hand_computed_logits():
    # Context [1, 4, 1]: tokens 1 and 4 seen (1 twice, penalised once). Repetition 2: 3 -> 1.5, -1 -> -2;
    # then presence 0.5: 1.5 -> 1.0, -2 -> -2.5. Unseen tokens keep their logits.
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5)
    out = np.array(apply_penalties(LOGITS, [1, 4, 1], params))
    np.testing.assert_allclose(out, [1.0, 1.0, 2.0, 0.5, -2.5])
    np.testing.assert_allclose(np.array(LOGITS), [1.0, 3.0, 2.0, 0.5, -1.0])  # input untouched
    only_presence = np.array(apply_penalties(LOGITS, [2], SamplingParams(presence_penalty=1.5)))
    np.testing.assert_allclose(only_presence, [1.0, 3.0, 0.5, 0.5, -1.0])


def test_penalties_change_the_greedy_choice_and_follow_generated_tokens():
    # Without penalties greedy picks 1. Context {1}: 3 -> 1.0 < 2, pick 2. {1, 2}: 2 -> 0.5, token 0
    # (1.0) ties token 1 (1.0), argmax takes the first: 0. {0, 1, 2}: 1 -> 0, so token 1 (1.0) wins.
    sample = make_sampler(SamplingParams(0.0, repetition_penalty=2.0, presence_penalty=0.5), context=[1])
    assert [sample(LOGITS) for _ in range(3)] == [2, 0, 1]
    assert make_sampler(SamplingParams(0.0))(LOGITS) == 1


def test_penalty_window_counts_only_recent_tokens():
    params = SamplingParams(0.0, presence_penalty=10.0, penalty_window=2)
    assert make_sampler(params, context=[1, 0, 3])(LOGITS) == 1  # 1 fell out of the window
    assert make_sampler(params, context=[0, 1, 3])(LOGITS) == 2
    sample = make_sampler(params, context=[9, 9, 1])
    sample.reset_context([0, 3])
    assert sample(LOGITS) == 1


def test_penalised_frequencies_follow_softmax_of_penalised_logits():
    n = 4000
    params = SamplingParams(1.0, repetition_penalty=1.5, presence_penalty=0.4, seed=3)
    penalised = np.array(apply_penalties(LOGITS, [1, 3], params))
    p = np.exp(penalised) / np.exp(penalised).sum()
    counts = Counter()
    sample = make_sampler(params)
    for _ in range(n):
        sample.reset_context([1, 3])
        counts[sample(LOGITS)] += 1
    observed = np.array([counts[i] for i in range(len(p))]) / n
    assert (np.abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3).all(), (observed, p)


def test_defaults_come_from_generation_config_then_the_model_card():
    assert default_sampling_params({}, thinking=True) == SamplingParams(0.6, top_p=0.95, top_k=20)
    assert default_sampling_params({}, thinking=False) == SamplingParams(
        0.7, top_p=0.8, top_k=20, presence_penalty=1.5
    )
    config = {"temperature": 0.3, "top_k": 40, "repetition_penalty": 1.1, "eos_token_id": [1]}
    got = default_sampling_params(config, thinking=True)
    assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.3, 0.95, 40, 1.1)
    assert default_sampling_params({"do_sample": False, "temperature": 0.6}, thinking=True).greedy
    assert default_sampling_params(config, thinking=False).temperature == 0.7
    with pytest.raises(ConfigError, match="generation_config.json"):
        default_sampling_params({"top_p": 2.0}, thinking=True)


@pytest.mark.parametrize(
    "kwargs", [{"repetition_penalty": 0}, {"presence_penalty": float("nan")}, {"penalty_window": 0}]
)
def test_invalid_penalties_raise_clear_errors(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)
