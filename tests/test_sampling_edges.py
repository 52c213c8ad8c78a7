"""Edges of sampling that mutation testing found unguarded (tools/mutation.py sampling): the exact
boundaries of each filter and parameter, against hand-computed sets."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.generation.sampling import (
    SamplingParams,
    filter_logits,
    make_sampler,
    model_max_tokens,
    model_thinks_by_default,
)

LOGITS = mx.array([1.0, 3.0, 2.0, 0.5, -1.0])


def kept(logits, **kwargs):
    return set(np.flatnonzero(np.isfinite(np.array(filter_logits(logits, SamplingParams(1.0, **kwargs))))))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"penalty_window": 0}, "penalty_window"),
    ],
)
def test_invalid_params_name_the_parameter(kwargs, name):
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        SamplingParams(**kwargs)


def test_boundary_params_are_valid():
    for kwargs in (
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_k": 0},
        {"min_p": 0.0},
        {"repetition_penalty": 0.5},
        {"presence_penalty": -2.0},
        {"seed": 0},
        {"seed": 2**63},
        {"seed": 2**64 - 1},
        {"penalty_window": 1},
    ):
        SamplingParams(**kwargs)


def test_unseeded_sampling_works():
    sample = make_sampler(SamplingParams(1.0, top_k=2))
    assert {sample(LOGITS) for _ in range(20)} <= {1, 2}


def test_penalties_without_context_change_nothing():
    # Penalties on, nothing seen yet: greedy still takes the plain argmax.
    assert make_sampler(SamplingParams(0.0, presence_penalty=5.0, repetition_penalty=3.0))(LOGITS) == 1


def test_top_p_stops_where_the_mass_reaches_it():
    # Four equal tokens: probabilities 0.25 exactly. top_p 0.5 is reached by the first two: the third,
    # whose preceding mass is exactly 0.5, is out.
    assert len(kept(mx.zeros(4), top_p=0.5)) == 2
    assert len(kept(mx.zeros(4), top_p=0.51)) == 3


def test_default_top_p_keeps_tokens_whose_probability_rounds_away():
    # exp(-30) is below float32's resolution next to 1: top_p = 1 must still keep every finite token.
    assert kept(mx.array([0.0, -30.0, -30.0])) == {0, 1, 2}


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # p1 / p0 = 0.5 = min_p: kept (llama.cpp keeps p >= min_p * p_max).
    logits = mx.concatenate([mx.array([0.0]), mx.log(mx.array([0.5]))])
    assert kept(logits, min_p=0.5) == {0, 1}
    assert kept(logits, min_p=0.6) == {0}


def test_filtering_keeps_the_logits_dtype():
    for dtype in (mx.bfloat16, mx.float16):
        assert filter_logits(LOGITS.astype(dtype), SamplingParams(1.0, top_k=2)).dtype == dtype


def test_model_defaults_read_generation_config():
    assert model_thinks_by_default({}) is True
    assert model_thinks_by_default({"enable_thinking": True}) is True
    assert model_thinks_by_default({"enable_thinking": False}) is False
    with pytest.raises(ConfigError, match="^generation_config.json: enable_thinking must be true or false"):
        model_thinks_by_default({"enable_thinking": "yes"})
    assert model_max_tokens({}, 77) == 77
    assert model_max_tokens({"max_new_tokens": None}, 77) == 77
    assert model_max_tokens({"max_new_tokens": 1}, 77) == 1
    assert model_max_tokens({"max_new_tokens": 300}, 77) == 300
    for bad in (0, -1, True, 2.0, "5"):
        with pytest.raises(ConfigError, match="^generation_config.json: max_new_tokens must be a positive"):
            model_max_tokens({"max_new_tokens": bad}, 77)


def test_accepted_tokens_join_the_penalty_context():
    # A token picked elsewhere (a batch's shared argmax) is penalised like one this sampler picked:
    # token 1 (logit 3) minus presence 2 = 1 < token 2's 2.
    sample = make_sampler(SamplingParams(0.0, presence_penalty=2.0))
    sample.accept(1)
    assert sample(LOGITS) == 2
