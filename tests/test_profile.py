"""Expert profiles and `--preload hot`: counts equal the recorded routing, the file round-trips and names
its model, the preload fills each pool with exactly its most-routed experts, hits more, and never changes
a logit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.storage import profile_file
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.session import model_identity
from streamer.synthetic.demo import demo_checkpoint
from streamer.synthetic.writer import generate
from streamer.tuning import profile as prof
from streamer.tuning.trace import RouteTrace

STDLIB = Path(os.__file__).parent
PROFILE_TEXT = STDLIB / "json" / "decoder.py"  # what the demo was trained on
HELD_OUT = Path(prof.__file__)  # this repository's own source: not in the training set
SHARE = 0.3  # of all experts, the cache size of the hit-rate checks


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo model, packed into a temporary directory."""
    dst = tmp_path_factory.mktemp("profile") / "demo"
    run_repack(make_plan(demo_checkpoint(), dst))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile-tiny")
    run_repack(make_plan(generate(root / "src", "tiny", dtype="float32"), root / "packed"))
    return root / "packed"


@pytest.fixture(scope="module")
def demo_profile(demo, tmp_path_factory):
    """(profile, trace path) of one teacher-forced run over PROFILE_TEXT, traced as it ran."""
    trace = tmp_path_factory.mktemp("profile-trace") / "trace.jsonl"
    with load_engine(demo, _config(demo, SHARE)) as engine:
        tracer = RouteTrace(trace)
        try:
            # Small chunks and windows: several chunks per window, several windows, a partial tail.
            result = prof.profile_texts(
                engine, [PROFILE_TEXT], max_tokens=700, window=256, chunk=96, on_route=tracer
            )
        finally:
            tracer.close()
    return result, trace


@pytest.fixture(autouse=True)
def _homes(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))


def _config(packed: Path, share: float, **kw) -> RuntimeConfig:
    layers = json.loads((packed / "manifest.json").read_text())["layers"]
    return RuntimeConfig(cache_experts=int(share * sum(l["num_experts"] for l in layers)), **kw)


def _run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.strip().splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# Counting


def test_profile_counts_equal_a_hand_count_of_the_recorded_trace(demo_profile):
    profile, trace = demo_profile
    hand = [[0] * 64 for _ in range(8)]
    tokens = 0
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        for row in record["experts"]:
            assert len(row) == 8
            for e in row:
                hand[record["layer"]][e] += 1
        tokens += len(record["experts"]) if record["layer"] == 0 else 0
    assert [profile.counts(layer) for layer in range(8)] == hand
    assert profile.tokens == tokens == 700
    assert all(sum(c) == 700 * 8 for c in hand)
    assert profile.sources == [
        {"kind": "text", "name": "decoder.py", "bytes": PROFILE_TEXT.stat().st_size, "tokens": 700}
    ]


def test_profile_from_the_trace_equals_the_profile_of_the_run(demo, demo_profile):
    profile, trace = demo_profile
    again = prof.profile_traces([trace], model_identity(demo), [64] * 8, 8)
    assert again.arrays == profile.arrays and again.tokens == profile.tokens
    assert again.model == profile.model and again.sources[0]["kind"] == "trace"


def test_max_tokens_spans_files_and_windows_restart_the_context(demo, tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n" * 40)
    b.write_text(PROFILE_TEXT.read_text())
    with load_engine(demo, _config(demo, SHARE)) as engine:
        n_a = len(engine.tokenizer.encode(a.read_text()))
        result = prof.profile_texts(engine, [a, b], max_tokens=n_a + 50)
    assert [s["tokens"] for s in result.sources] == [n_a, 50] and result.tokens == n_a + 50


# ----------------------------------------------------------------------------------------------------
# The file


def test_format_round_trips_and_keeps_named_arrays(demo_profile, tmp_path):
    profile, _ = demo_profile
    path = profile_file.write_profile(profile, tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == "streamer-expert-profile" and data["version"] == 1
    back = profile_file.read_profile(path)
    assert back.arrays == profile.arrays and back.tokens == profile.tokens and back.model == profile.model
    # Room for more per-expert arrays (the prune issue's saliency): readers keep what they do not use.
    data["layers"][0]["experts"]["reap"] = [0.5] * 64
    path.write_text(json.dumps(data))
    assert profile_file.read_profile(path).arrays[0]["reap"] == [0.5] * 64


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.update(version=2), "version 2 is newer than this streamer reads (1)"),
        (lambda d: d.update(format="other"), "not a streamer expert profile"),
        (lambda d: d["layers"][3]["experts"]["routed"].pop(), "layer 3 'routed' has not 64 values"),
        (lambda d: d["layers"][1]["experts"]["routed"].__setitem__(0, -1), "not a count"),
        (lambda d: d.pop("model"), "malformed profile"),
    ],
)
def test_damaged_or_future_profiles_are_clear_errors(demo_profile, tmp_path, damage, message):
    path = profile_file.write_profile(demo_profile[0], tmp_path / "p.json")
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(profile_file.ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profile_file.read_profile(path)


# ----------------------------------------------------------------------------------------------------
# --preload hot


def _decode_hits(engine, ids: list[int]) -> tuple[int, int]:
    """(hits, misses) of feeding ``ids`` one at a time as decode steps from an empty context."""
    cache, before = engine.model.make_cache(), engine.stats()
    for tok in ids:
        mx.eval(engine.model(mx.array([[tok]]), cache=cache))
    after = engine.stats()
    return after["cache_hits"] - before["cache_hits"], after["cache_misses"] - before["cache_misses"]


def test_preload_hot_fills_each_pool_with_its_top_experts_and_hits_more(demo, demo_profile, tmp_path):
    profile, _ = demo_profile
    path = profile_file.write_profile(profile, tmp_path / "p.json")
    config = _config(demo, SHARE, preload="hot", profile=str(path))
    with load_engine(demo, config) as hot, load_engine(demo, _config(demo, SHARE)) as cold:
        ids = hot.tokenizer.encode(HELD_OUT.read_text())[:32]
        rt = hot.runtime
        slots = rt.cache.pool(0).slots  # one pool: every layer has the same block shape
        assert {id(rt.cache.pool(l)) for l in range(8)} == {id(rt.cache.pool(0))}
        ranked = sorted((-c, l, e) for l in range(8) for e, c in enumerate(profile.counts(l)))
        want = {(l, e) for _, l, e in ranked[:slots]}
        have = {(l, e) for l in range(8) for e in rt.cache.resident_experts(l)}
        assert have == want and len(have) == slots
        assert rt.snapshot_stats()["cache_hits"] == rt.snapshot_stats()["cache_misses"] == 0
        assert cold.runtime.cache.used_slots(0) == 0
        first = _decode_hits(hot, ids[:1]), _decode_hits(cold, ids[:1])
        hot_hits, hot_misses = _decode_hits(hot, ids)
        cold_hits, cold_misses = _decode_hits(cold, ids)
    assert first[1] == (0, 64) and first[0][0] >= 16  # the first token: a cold cache misses everything
    assert hot_hits + hot_misses == cold_hits + cold_misses == 32 * 8 * 8
    assert hot_hits > cold_hits


def test_preload_keys_makes_the_first_keys_the_last_to_leave(demo):
    for policy in ("lru", "lfu"):
        with load_engine(demo, _config(demo, 0.2, cache_policy=policy)) as engine:
            rt = engine.runtime
            keys = [(l, e) for l in range(7) for e in range(64)][: rt.cache.pool(0).slots]
            keys = keys[::3] + keys[1::3] + keys[2::3]  # an order that is not the read order
            assert rt.preload_keys(keys) == len(keys) == rt.cache.used_slots(0)
            assert rt.preload_keys(keys) == 0  # already there
            for e in range(40):  # 40 misses of layer 7 (never preloaded): each evicts one expert
                rt.release(7, rt.acquire(7, [e]))
            kept = {(l, e) for l in range(7) for e in rt.cache.resident_experts(l)}
            assert kept == set(keys[: len(keys) - 40]), policy


def test_preload_never_changes_logits(demo, demo_profile, tmp_path):
    path = profile_file.write_profile(demo_profile[0], tmp_path / "p.json")
    out = {}
    for mode in ("none", "hot", "all"):
        with load_engine(demo, _config(demo, SHARE, preload=mode, profile=str(path))) as engine:
            ids = engine.tokenizer.encode(HELD_OUT.read_text())[:24]
            cache, logits = engine.model.make_cache(), []
            logits.append(np.array(engine.model(mx.array([ids[:16]]), cache=cache)[0]))
            for tok in ids[16:]:
                logits.append(np.array(engine.model(mx.array([[tok]]), cache=cache)[0]))
            out[mode] = logits
    for mode in ("hot", "all"):
        assert all(np.array_equal(a, b) for a, b in zip(out["none"], out[mode], strict=True)), mode


# ----------------------------------------------------------------------------------------------------
# The CLI


def test_cli_profiles_then_preloads_hot(demo, tmp_path):
    text = tmp_path / "t.py"
    text.write_text(PROFILE_TEXT.read_text())
    result = _run("profile", demo, "--text", text, "--max-tokens", 300)
    assert "profiled 300 tokens of 1 file(s)" in result.output
    assert profile_file.read_profile(demo / "profile.json").tokens == 300
    out = _run("generate", demo, "-p", "def f(x):", "--max-tokens", 4, "--preload", "hot", "--json")
    plain = _run("generate", demo, "-p", "def f(x):", "--max-tokens", 4, "--json")
    assert (
        json.loads(out.stdout.splitlines()[-1])["text"] == json.loads(plain.stdout.splitlines()[-1])["text"]
    )
    (demo / "profile.json").unlink()


def test_cli_bad_inputs_give_one_line_errors(demo, tiny, tmp_path):
    missing = tmp_path / "nope.txt"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\n\xff\xfe\x00")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "--text " in _error(_run("profile", demo, "--text", missing, ok=False))
    assert "not UTF-8 text (byte 4)" in _error(_run("profile", demo, "--text", binary, ok=False))
    assert "the text is empty" in _error(_run("profile", demo, "--text", empty, ok=False))
    assert "not both" in _error(_run("profile", demo, ok=False))
    assert "no such trace file" in _error(_run("profile", demo, "--trace", missing, ok=False))
    # No profile yet: say how to make one.
    line = _error(_run("generate", demo, "-p", "x", "--preload", "hot", ok=False))
    assert f"run `streamer profile {demo} --text FILE` first" in line
    # A trace recorded with another model, and a profile of another model.
    trace = tmp_path / "tiny.jsonl"
    _run("bench", tiny, "--prompt-tokens", 8, "-n", 2, "--no-disk-test", "--trace", trace)
    assert "recorded with another model" in _error(_run("profile", demo, "--trace", trace, ok=False))
    _run("profile", tiny, "--trace", trace, "--out", tmp_path / "tiny-profile.json")
    line = _error(
        _run(
            "generate",
            demo,
            "-p",
            "x",
            "--preload",
            "hot",
            "--profile",
            tmp_path / "tiny-profile.json",
            ok=False,
        )
    )
    assert "is the profile of model 'packed', not of this one ('demo')" in line
    # A future version.
    data = json.loads((tmp_path / "tiny-profile.json").read_text())
    data["version"] = 9
    (tmp_path / "future.json").write_text(json.dumps(data))
    line = _error(
        _run("generate", tiny, "-p", "x", "--preload", "hot", "--profile", tmp_path / "future.json", ok=False)
    )
    assert "version 9 is newer" in line
