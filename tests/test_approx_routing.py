"""Opt-in approximate routing: --experts-per-token and --cache-bias.

Exact stays exact (bitwise) when the flags are off or neutral; fewer experts per token computes what a
hand-written reference block computes; cache-aware routing really saves misses; the divergence report
agrees with hand-computed numbers; every front end labels approximate output; bad values are refused.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.errors import ConfigError
from streamer.loader import describe_routing, load_engine
from streamer.models.args import ModelArgs
from streamer.models.moe_block import SparseMoeBlock
from streamer.settings import RuntimeConfig
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.presets import get_preset
from streamer.synthetic.writer import generate
from streamer.tuning.divergence import PassResult, compare, measure_divergence, teacher_forced

# A stream with repeats and variety: teacher-forced text for the divergence and miss counts.
TOKENS = [(i * 37 + (i // 7) * 11) % 500 + 3 for i in range(48)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(source checkpoint, packed directory) of the tiny preset (4 layers, 16 experts top-4)."""
    root = tmp_path_factory.mktemp("approx")
    src = generate(root / "src", "tiny", dtype="float32", seed=3)
    run_repack(make_plan(src, root / "packed"))
    return src, root / "packed"


@pytest.fixture(autouse=True)
def _homes(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))


def _logits(engine, tokens=TOKENS[:16], steps=6) -> np.ndarray:
    """Prefill logits, then teacher-forced decode logits, stacked: [positions, V]."""
    cache = engine.model.make_cache()
    out = [np.array(engine.model(mx.array([tokens]), cache=cache)[0])]
    for t in TOKENS[16 : 16 + steps]:
        out.append(np.array(engine.model(mx.array([[t]]), cache=cache)[0]))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# Exact stays exact.


@pytest.mark.parametrize("streamed", [False, True])
def test_experts_per_token_equal_to_top_k_is_bitwise_exact(model, streamed):
    src, packed = model
    path, kw = (packed, {"cache_experts": 8}) if streamed else (src, {})
    with load_engine(path, RuntimeConfig(**kw), resident=not streamed) as engine:
        exact = _logits(engine)
        top_k = engine.args.num_experts_per_tok
    with load_engine(path, RuntimeConfig(experts_per_token=top_k, **kw), resident=not streamed) as engine:
        assert engine.model.layers[0].mlp.experts_per_token == top_k  # set, through the same path
        assert engine.routing == {"mode": "exact"}
        same = _logits(engine)
    assert np.array_equal(exact, same)


def test_cache_bias_zero_or_everything_cached_is_bitwise_exact(model):
    _, packed = model
    with load_engine(packed, RuntimeConfig(cache_experts=8)) as engine:
        exact = _logits(engine)
        for layer in engine.model.layers:  # a bias of 0 with a mask: the mask is never consulted
            layer.mlp.set_routing(None, 0.0, lambda: pytest.fail("mask read with bias 0"))
        assert np.array_equal(exact, _logits(engine))
    # Every expert cached: nothing to favour (the runtime says None), so a bias changes nothing.
    with load_engine(packed, RuntimeConfig(cache_experts=64, preload="all", cache_bias=3.0)) as engine:
        assert engine.runtime.cached_mask(0) is None
        biased = _logits(engine)
    with load_engine(packed, RuntimeConfig(cache_experts=64, preload="all")) as engine:
        assert np.array_equal(_logits(engine), biased)


# ---------------------------------------------------------------------------------------------------------
# The approximate math against a slow, obvious reference.


def _reference_block(block: SparseMoeBlock, x: np.ndarray, k: int, bias: np.ndarray | None) -> np.ndarray:
    """Per token: top-k of (logits + bias), weights = unbiased probabilities (renormalised if the model
    says so), each chosen expert run alone; plus the gated shared expert."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        xt = mx.array(t[None, None])
        logits = np.array(block.gate(xt)).reshape(-1).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-(logits + (0 if bias is None else bias)), kind="stable")[:k]
        w = probs[chosen] / (probs[chosen].sum() if block.norm_topk_prob else 1.0)
        y = sum(
            wi * np.array(block.experts(xt, mx.array([[[int(e)]]])))[0, 0, 0]
            for wi, e in zip(w, chosen, strict=True)
        )
        shared = np.array(mx.sigmoid(block.shared_expert_gate(xt)) * block.shared_expert(xt))[0, 0]
        out.append(y + shared)
    return np.stack(out).reshape(x.shape)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k,bias", [(2, None), (1, None), (4, 1.5), (3, 0.7)])
def test_block_matches_the_reference(norm, k, bias):
    args = ModelArgs.from_dict({**get_preset("tiny").text_config, "norm_topk_prob": norm})
    mx.random.seed(0)
    block = SparseMoeBlock(args)
    block.update(
        {"gate": {"weight": mx.random.normal(block.gate.weight.shape) * 0.5}}
    )  # a router with preferences
    mx.eval(block.parameters())
    x = np.random.default_rng(1).standard_normal((1, 5, args.hidden_size)).astype(np.float32)
    mask = np.zeros(args.num_experts, np.float32)
    mask[::3] = 1.0
    block.set_routing(k, bias or 0.0, (lambda: mx.array(mask)) if bias else None)
    got = np.array(block(mx.array(x)))
    want = _reference_block(block, x, k, None if bias is None else bias * mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_block_refuses_bad_routing():
    block = SparseMoeBlock(ModelArgs.from_dict(get_preset("tiny").text_config))
    for k in (0, 5):
        with pytest.raises(ValueError, match=r"1 \.\. 4"):
            block.set_routing(k)
    with pytest.raises(ValueError, match="finite"):
        block.set_routing(None, math.inf, lambda: None)
    with pytest.raises(ValueError, match="cached_mask"):
        block.set_routing(None, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Cache-aware routing saves misses.


def test_cache_bias_reduces_misses_on_a_small_cache(model):
    _, packed = model
    runs = {}
    for bias in (0.0, 2.0):
        with load_engine(packed, RuntimeConfig(cache_experts=12, cache_bias=bias)) as engine:
            runs[bias] = teacher_forced(engine, TOKENS, 8)
    exact, biased = runs[0.0].counters, runs[2.0].counters
    assert exact["cache_misses"] > 0
    assert biased["cache_misses"] < 0.8 * exact["cache_misses"]
    assert biased["bytes_read"] < exact["bytes_read"]
    # Same work: one lookup per (token, layer, expert) in both runs.
    assert biased["cache_hits"] + biased["cache_misses"] == exact["cache_hits"] + exact["cache_misses"]
    assert runs[2.0].routing == {
        "mode": "approximate", "experts_per_token": 4, "model_experts_per_token": 4, "cache_bias": 2.0,
    }  # fmt: skip


def test_cached_mask_is_what_the_cache_holds(model):
    _, packed = model
    with load_engine(packed, RuntimeConfig(cache_experts=12)) as engine:
        _logits(engine, steps=2)
        for layer in range(engine.args.num_hidden_layers):
            mask = np.array(engine.runtime.cached_mask(layer))
            assert sorted(np.flatnonzero(mask)) == engine.runtime.cache.resident_experts(layer)


# ---------------------------------------------------------------------------------------------------------
# The divergence report.


def _pass(probs, targets, misses=0) -> PassResult:
    lp = np.log(np.asarray(probs, dtype=np.float64))
    return PassResult(lp, np.asarray(targets), {"cache_misses": misses}, {"mode": "exact"})


def test_divergence_against_hand_computed_numbers():
    p = [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]]
    q = [[0.2, 0.6, 0.2], [0.25, 0.5, 0.25]]
    same = compare(_pass(p, [0, 1], 10), _pass(p, [0, 1], 10))
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == 0.0 and same["loss_change"] == 0.0
    d = compare(_pass(p, [0, 1], 10), _pass(q, [0, 1], 4))
    kl_first = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.6) + 0.1 * math.log(0.1 / 0.2)
    assert d["mean_kl"] == pytest.approx(kl_first / 2, rel=1e-12)
    assert d["top1_agreement"] == 0.5
    loss_exact = -(math.log(0.7) + math.log(0.5)) / 2
    loss_approx = -(math.log(0.2) + math.log(0.5)) / 2
    assert d["loss_exact"] == pytest.approx(loss_exact) and d["loss_approx"] == pytest.approx(loss_approx)
    assert d["loss_change"] == pytest.approx(loss_approx / loss_exact - 1)
    assert (d["exact"]["cache_misses"], d["approx"]["cache_misses"]) == (10, 4)
    with pytest.raises(ValueError, match="same tokens"):
        compare(_pass(p, [0, 1]), _pass(p, [0, 2]))


def test_measure_divergence_exact_vs_itself_and_vs_fewer_experts(model):
    _, packed = model

    def load(cfg):
        return load_engine(packed, cfg)

    same = measure_divergence(load, RuntimeConfig(cache_experts=12), TOKENS[:24], 8)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == 0.0 and same["loss_change"] == 0.0
    assert same["exact"] == same["approx"] and same["exact"]["cache_misses"] > 0
    fewer = measure_divergence(load, RuntimeConfig(cache_experts=12, experts_per_token=1), TOKENS[:24], 8)
    assert fewer["mean_kl"] > 1e-4 and fewer["loss_approx"] != fewer["loss_exact"]
    assert fewer["approx"]["cache_hits"] + fewer["approx"]["cache_misses"] < (
        fewer["exact"]["cache_hits"] + fewer["exact"]["cache_misses"]
    )  # one expert per token looked up instead of four
    assert fewer["routing"]["experts_per_token"] == 1


# ---------------------------------------------------------------------------------------------------------
# Labels and errors at the front ends.


def _run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_generate_json_and_stats_label_the_routing(model):
    _, packed = model
    exact = json.loads(_run("generate", packed, "--prompt-ids", "1,2,3", "-n", 3, "--json").stdout)
    assert exact["stats"]["routing"] == {"mode": "exact"}
    approx = _run("generate", packed, "--prompt-ids", "1,2,3", "-n", 3, "--json", "--experts-per-token", 2)
    routing = json.loads(approx.stdout)["stats"]["routing"]
    assert routing == {"mode": "approximate", "experts_per_token": 2, "model_experts_per_token": 4,
                       "cache_bias": 0.0}  # fmt: skip
    text = _run("generate", packed, "--prompt-ids", "1,2,3", "-n", 3, "--stats", "--cache-bias", "1")
    assert "APPROXIMATE routing (cache bias 1)" in text.stderr
    assert "--compare-exact" in text.stderr


def test_bench_labels_and_compares_with_exact(model):
    _, packed = model
    common = ("bench", packed, "--prompt-tokens", 16, "-n", 4, "--cache-experts", 12, "--no-disk-test")
    out = json.loads(_run(*common, "--json").stdout.strip().splitlines()[-1])
    assert out["routing"] == {"mode": "exact"} and "compare_exact" not in out
    out = json.loads(
        _run(*common, "--cache-bias", 2, "--compare-exact", "--compare-tokens", 40, "--json")
        .stdout.strip()
        .splitlines()[-1]
    )
    c = out["compare_exact"]
    assert out["routing"]["mode"] == "approximate" and c["routing"]["cache_bias"] == 2.0
    assert c["positions"] == 40 - 20 and 0 <= c["top1_agreement"] <= 1 and c["mean_kl"] >= 0
    assert c["approx"]["cache_misses"] < c["exact"]["cache_misses"]
    text = _run(*common, "--experts-per-token", 2, "--compare-exact", "--compare-tokens", 40).stdout
    assert "routing: APPROXIMATE routing (2 of 4 experts per token)" in text
    assert "top-1 agreement" in text and "KL(exact||approx)" in text and "decode misses" in text


def test_chat_banner_and_piped_chat_label_the_routing(model, tmp_path):
    from streamer.cli.chat import _ChatLoop
    from streamer.generation.chat_session import ChatSession
    from streamer.generation.sampling import SamplingParams

    _, packed = model
    with load_engine(packed, RuntimeConfig(experts_per_token=3)) as engine:
        banner = _ChatLoop(ChatSession(engine, SamplingParams(0.0)), False)._banner()
    assert "APPROXIMATE routing (3 of 4 experts per token)" in banner
    with load_engine(packed) as engine:
        assert "exact routing" in _ChatLoop(ChatSession(engine, SamplingParams(0.0)), False)._banner()
    env = {**os.environ, "STREAMER_HOME": str(tmp_path / "h"), "STREAMER_CACHE": str(tmp_path / "c")}
    cmd = [sys.executable, "-c", "from streamer.cli.main import main; main()", "chat", str(packed)]
    r = subprocess.run([*cmd, "-n", "2", "--cache-bias", "0.5"], input=b"hi\n/stats\n", capture_output=True,
                       env=env, timeout=120)  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "APPROXIMATE routing (cache bias 0.5)" in err.splitlines()[0]
    assert err.strip().splitlines()[-1].endswith("APPROXIMATE routing (cache bias 0.5)")  # /stats


def test_engine_stats_carry_the_routing_for_serve(model):
    _, packed = model
    with load_engine(packed, RuntimeConfig(cache_bias=0.25)) as engine:
        assert engine.stats()["routing"]["cache_bias"] == 0.25
    src, _ = model
    with load_engine(src, RuntimeConfig(), resident=True) as engine:
        assert engine.stats() == {"routing": {"mode": "exact"}}
    assert describe_routing({"mode": "exact"}) == "exact routing"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--experts-per-token", 0], "--experts-per-token must be at least 1"),
        (["--experts-per-token", 5], "--experts-per-token 5 is more than the model's 4 experts per token"),
        (["--cache-bias", -1], "--cache-bias must be a finite number >= 0"),
        (["--cache-bias", "inf"], "--cache-bias must be a finite number >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(model, flags, message):
    _, packed = model
    r = _run("generate", packed, "--prompt-ids", "1,2", "-n", 2, *flags, ok=False)
    assert r.exit_code != 0 and message in r.output


def test_cache_bias_needs_a_streamed_model(model):
    src, _ = model
    with pytest.raises(ConfigError, match="--resident model has none"):
        load_engine(src, RuntimeConfig(cache_bias=1.0), resident=True)


def test_serve_stats_label_the_routing(model):
    from streamer.serve.http import ServeConfig, start_server
    from tests.serve.helpers import raw, stats

    _, packed = model
    s = start_server(
        lambda: load_engine(packed, RuntimeConfig(experts_per_token=2)),
        ServeConfig(port=0, model_names=("tiny",)),
    ).start_background()
    try:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}).encode()
        status, _ = raw(s, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert status == 200
        for _ in range(500):  # the worker records engine stats just after the answer is sent
            if "routing" in (experts := stats(s)["experts"]):
                break
            time.sleep(0.01)
        assert experts["routing"]["mode"] == "approximate"
        assert experts["routing"]["experts_per_token"] == 2
    finally:
        s.close()
