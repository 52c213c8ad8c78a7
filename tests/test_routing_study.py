"""The routing-study model's recipe (tools/train_demo.py --preset) and compact (gzipped) routing traces."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from streamer.tuning.cache_sim import TraceError, read_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_routing_study_preset_has_the_flagships_routing_shape():
    import train_demo

    cfg = train_demo.config_from_args(train_demo.parse_args(["--preset", "routing-study"]))
    assert (cfg.num_experts, cfg.top_k) == (256, 10)  # the 397B: 512 top-10
    assert (cfg.num_layers, cfg.hidden_size, cfg.moe_intermediate_size) == (4, 64, 64)
    # Flags still override a preset's fields; no preset is the shipped demo.
    assert (
        train_demo.config_from_args(
            train_demo.parse_args(["--preset", "routing-study", "--top-k", "8"])
        ).top_k
        == 8
    )
    demo = train_demo.config_from_args(train_demo.parse_args([]))
    assert (demo.num_experts, demo.top_k, demo.num_layers) == (64, 8, 8)


def test_gzipped_traces_read_like_plain_ones(tmp_path):
    lines = [{"pos": 0, "layer": 0, "experts": [[1, 2], [2, 3]]}, {"pos": 2, "layer": 0, "experts": [[4, 1]]}]
    plain, packed = tmp_path / "t.jsonl", tmp_path / "t.jsonl.gz"
    plain.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert read_trace(packed) == read_trace(plain)
    assert [s.experts for s in read_trace(packed)] == [(1, 2, 3), (1, 4)]
    with gzip.open(tmp_path / "bad.gz", "wt") as f:
        f.write("not json\n")
    with pytest.raises(TraceError, match="line 1: not a routing record"):
        read_trace(tmp_path / "bad.gz")


def test_committed_traces_are_readable():
    traces = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "traces").glob("*.jsonl.gz"))
    for trace in traces:
        steps = read_trace(trace)
        assert sum(s.is_decode for s in steps) > 100
