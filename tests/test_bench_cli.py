"""`streamer bench` and `streamer advise` on a tiny packed model: sane numbers, traces, clear errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = generate(root / "tiny-src", "tiny", dtype="float32")
    dst = root / "tiny-packed"
    run_repack(make_plan(src, dst))
    return dst


@pytest.fixture(autouse=True)
def _homes(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))


def _run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def _expert_bytes(packed) -> int:
    layers = json.loads((packed / "manifest.json").read_text())["layers"]
    return sum(l["num_experts"] * l["block_bytes"] for l in layers)


def test_bench_json_reports_both_phases(packed):
    out = _json(_run("bench", packed, "--prompt-tokens", 40, "-n", 6, "--cache-experts", 24, "--json"))
    p, d = out["prompt"], out["decode"]
    assert (p["tokens"], d["tokens"]) == (40, 5)  # the first token comes out of the prefill
    assert p["tps"] > 0 and d["tps"] > 0 and out["compute_ms_per_token"] > 0
    assert p["cache_misses"] > 0 and p["bytes_read"] > 0  # a cold cache reads
    for phase in (p, d):
        assert 0 <= phase["hit_rate"] <= 1 and 0 <= phase["stall_share"] <= 1
        assert phase["cache_hits"] + phase["cache_misses"] > 0
    assert out["disk"]["read_gbps"] > 0 and out["disk"]["io_mode"] in ("direct", "buffered")
    assert 0 < out["cache_bytes"] < out["expert_bytes"]


def test_bench_concurrency_decodes_the_streams_together(packed, tmp_path):
    trace = tmp_path / "route.jsonl"
    args = ("bench", packed, "--prompt-tokens", 12, "-n", 5, "--cache-experts", 24, "--no-disk-test")
    out = _json(_run(*args, "--concurrency", 3, "--trace", trace, "--json"))
    assert out["concurrency"] == 3
    assert (out["prompt"]["tokens"], out["decode"]["tokens"]) == (36, 3 * 4)
    # The decode phase's 4 steps each route the 3 streams' tokens together: one record of 3 rows per
    # layer and step (the prefill records have 12 rows, the earlier lone decodes fewer).
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    rows = [len(r["experts"]) for r in records if "experts" in r]
    layers = len(json.loads((packed / "manifest.json").read_text())["layers"])
    assert rows.count(3) >= 4 * layers
    text = _run(*args, "--concurrency", 2).output
    assert "2 streams together, aggregate" in text and "expert bytes read per generated token" in text


def test_bench_text_output_and_all_cached(packed, tmp_path):
    text = _run("bench", packed, "--prompt-tokens", 8, "-n", 3, "--cache-gb", 1, "--no-disk-test").output
    assert "prompt: 8 tokens at" in text and "decode: 2 tokens at" in text and "hit rate" in text
    trace = tmp_path / "t.jsonl"
    args = ("--prompt-tokens", 16, "-n", 6, "--cache-gb", 1, "--no-disk-test", "--json", "--trace", trace)
    out = _json(_run("bench", packed, *args))
    # Every expert fits: decode misses only the experts the prompt never routed to, once each.
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    seen = {(r["layer"], e) for r in rows if len(r["experts"]) > 1 for t in r["experts"] for e in t}
    new = {(r["layer"], e) for r in rows if len(r["experts"]) == 1 for e in r["experts"][0]} - seen
    assert out["decode"]["cache_misses"] == len(new)


def test_advise_replays_a_bench_trace_to_the_runtime_hit_rate(packed, tmp_path):
    trace = tmp_path / "route.jsonl"
    cache_gb = 0.3 * _expert_bytes(packed) / 1e9
    args = ("--prompt-tokens", 24, "-n", 20, "--cache-gb", cache_gb, "--no-disk-test", "--json")
    out = _json(_run("bench", packed, "--trace", trace, *args))
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == 4 * 20 and rows[0]["layer"] == 0 and len(rows[0]["experts"]) == 24
    advice = _json(
        _run("advise", trace, "--model", packed, "--cache-gb", f"{cache_gb},1", "--read-gbps", 2, "--json")
    )
    row, full = advice["rows"]
    # The simulator is the runtime's own policy: the same trace gives the same decode hit rate.
    assert row["hit_rate"] == pytest.approx(out["decode"]["hit_rate"])
    assert row["cache_bytes"] == out["cache_bytes"]
    assert row["optimal_hit_rate"] >= row["hit_rate"]
    assert full["hit_rate"] == 1.0 and full["missed_mb_per_token"] == 0
    assert row["serial_tps"] > 0 and row["overlapped_tps"] >= row["serial_tps"]


def test_advise_default_sizes_and_table(packed, tmp_path):
    trace = tmp_path / "route.jsonl"
    _run("bench", packed, "--prompt-tokens", 8, "-n", 8, "--no-disk-test", "--trace", trace)
    rows = _json(_run("advise", trace, "--model", packed, "--compute-ms", 5, "--read-gbps", 1, "--json"))[
        "rows"
    ]
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares) and shares[-1] == 1.0 and len(rows) >= 4
    assert [r["hit_rate"] for r in rows][-1] >= rows[0]["hit_rate"]
    text = _run("advise", trace, "--model", packed, "--compute-ms", 5, "--read-gbps", 1).output
    assert " lru " in text and " lfu " in text and "optimal" in text and "tok/s" in text and "5 ms" in text
    assert "recommended: --cache-policy " in text
    no_model = _json(_run("advise", trace, "--json"))["rows"]
    assert no_model[-1]["share"] == pytest.approx(1.0) and no_model[0]["cache_bytes"] is None


def test_advise_reports_every_policy_and_recommends_the_best(packed, tmp_path):
    """Each policy's hit rate is the simulator's on the same pools; the row's own policy is the best one,
    and the recommendation is the policy with the most hits over all sizes."""
    from streamer.tuning.cache_sim import read_trace, simulate

    trace = tmp_path / "route.jsonl"
    _run("bench", packed, "--prompt-tokens", 8, "-n", 24, "--no-disk-test", "--trace", trace)
    out = _json(_run("advise", trace, "--slots", "8,12,20,40", "--json"))
    steps = read_trace(trace)
    for r in out["rows"]:
        for policy, rate in r["policy_hit_rates"].items():
            assert rate == simulate(steps, r["slots"], policy=policy).decode_hit_rate
        assert r["hit_rate"] == max(r["policy_hit_rates"].values()) <= r["optimal_hit_rate"]
    sums = {p: sum(r["policy_hit_rates"][p] for r in out["rows"]) for p in ("lru", "lfu")}
    assert sums[out["recommended_policy"]] == max(sums.values())


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_advise_bad_inputs_give_one_line_errors(packed, tmp_path):
    assert "no such trace file" in _error_line(_run("advise", tmp_path / "missing.jsonl", ok=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pos": 0, "layer": 0, "experts": [[1, 2]]}\n{"pos": 1, "layer": 0, "experts": [[1,\n')
    assert "bad.jsonl line 2: not a routing record" in _error_line(_run("advise", bad, ok=False))
    other = tmp_path / "other.jsonl"  # expert 99 of a model with 16 per layer
    other.write_text('{"pos": 0, "layer": 0, "experts": [[1, 99]]}\n')
    assert "another model" in _error_line(
        _run("advise", other, "--model", packed, "--read-gbps", 1, ok=False)
    )
    good = tmp_path / "good.jsonl"
    good.write_text('{"pos": 0, "layer": 0, "experts": [[1, 2]]}\n')
    assert "need --model" in _error_line(_run("advise", good, "--cache-gb", 4, ok=False))
    assert "--cache-gb must be comma-separated" in _error_line(
        _run("advise", good, "--model", packed, "--cache-gb", "4,x", "--read-gbps", 1, ok=False)
    )
    assert "cannot hold one layer" in _error_line(
        _run("advise", good, "--model", packed, "--cache-gb", 1e-9, "--read-gbps", 1, ok=False)
    )


def test_bench_refuses_a_missing_model(tmp_path):
    line = _error_line(_run("bench", tmp_path / "nope", "--no-disk-test", ok=False))
    assert "nope" in line
