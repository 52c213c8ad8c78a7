"""Streaming never changes tokens: streamed experts give the resident model's logits exactly.

Every preset, cache sizes from one layer's top-k up to every expert, both I/O modes; plus telemetry
that shows the cache really worked (misses, bytes read), and read faults that surface clearly.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import StreamerError
from streamer.experts.budget import minimum_cache_bytes
from streamer.loader import load_engine
from streamer.models.args import ModelArgs
from streamer.settings import RuntimeConfig
from streamer.storage.packed import open_packed
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

PROMPT = [5, 77, 301, 12, 9, 44, 500, 3, 18, 250, 61, 7, 99, 140, 8, 2]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Source checkpoint and packed directory per preset (built once for the module)."""
    root = tmp_path_factory.mktemp("streaming")
    built = {}

    def get(preset: str):
        if preset not in built:
            src = generate(root / f"{preset}-src", preset, dtype="float32", seed=11)
            run_repack(make_plan(src, root / f"{preset}-packed"))
            built[preset] = (src, root / f"{preset}-packed")
        return built[preset]

    return get


def _logits(engine, tokens, steps):
    """Prefill logits of ``tokens`` then ``steps`` greedy decode logits, as numpy."""
    cache = engine.model.make_cache()
    out = []
    logits = engine.model(mx.array([tokens]), cache=cache)
    out.append(np.array(logits[0]))
    token = int(mx.argmax(logits[0, -1]).item())
    for _ in range(steps):
        logits = engine.model(mx.array([[token]]), cache=cache)
        out.append(np.array(logits[0]))
        token = int(mx.argmax(logits[0, -1]).item())
    return out


@pytest.fixture(scope="module")
def resident_logits(packed):
    results = {}

    def get(preset):
        if preset not in results:
            src, _ = packed(preset)
            with load_engine(src, resident=True) as engine:
                results[preset] = _logits(engine, PROMPT, 8)
        return results[preset]

    return get


def _cache_experts(args, which):
    k, e = args.num_experts_per_tok, args.num_experts
    return {"min": k, "half": max(k, e * args.num_hidden_layers // 2), "all": e * args.num_hidden_layers}[
        which
    ]


@pytest.mark.parametrize("preset", ["tiny", "like-397b", "like-35b", "reap", "mixed", "q8"])
@pytest.mark.parametrize("size", ["min", "half", "all"])
def test_streamed_equals_resident(packed, resident_logits, preset, size):
    _, dst = packed(preset)
    want = resident_logits(preset)
    args = ModelArgs.from_dict(json.loads((dst / "config.json").read_text()))
    if size == "min":
        config = RuntimeConfig(cache_bytes=minimum_cache_bytes(open_packed(dst), args))
    else:
        config = RuntimeConfig(cache_experts=_cache_experts(args, size))
    with load_engine(dst, config) as engine:
        got = _logits(engine, PROMPT, 8)
        stats = engine.stats()
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(g, w), f"{preset} cache={size}: step {step} differs by {np.abs(g - w).max()}"
    assert stats["cache_misses"] > 0 and stats["bytes_read"] > 0
    if size == "min":
        assert stats["cache_hits"] < stats["cache_misses"]


@pytest.mark.parametrize(
    "io_mode, prefetch",
    [("buffered", "off"), ("buffered", "predict"), ("direct", "parallel"), ("direct", "predict")],
)
@pytest.mark.parametrize("cache_experts", [8, 100])
def test_io_and_prefetch_modes_agree(packed, resident_logits, io_mode, prefetch, cache_experts):
    _, dst = packed("like-35b")
    if io_mode == "direct" and not _direct_io_works(dst / "experts" / "layer_000.bin"):
        pytest.skip("this filesystem refuses O_DIRECT (a platform limit, probed without streamer)")
    engine = load_engine(dst, RuntimeConfig(cache_experts=cache_experts, io_mode=io_mode, prefetch=prefetch))
    with engine:
        got = _logits(engine, PROMPT, 8)
        stats = engine.stats()
    for g, w in zip(got, resident_logits("like-35b"), strict=True):
        assert np.array_equal(g, w)
    if prefetch == "predict":
        assert stats["predicted"] > 0 and 0 <= stats["predicted_right"] <= stats["predicted"]


def _direct_io_works(file) -> bool:
    """Whether this filesystem allows an aligned O_DIRECT read, asked of the OS directly."""
    if not hasattr(os, "O_DIRECT"):
        return sys.platform == "darwin"  # macOS uses F_NOCACHE, which every filesystem accepts
    try:
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        return os.preadv(fd, [buf], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("preset", ["tiny", "like-35b", "mixed"])
def test_streamed_logits_match_mlx_lm(packed, preset):
    """Against the independent reference, not the engine's own resident path: a bug both share (a
    router, a norm) would pass the comparisons above and fail here."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    src, dst = packed(preset)
    ref, _ = mlx_lm_utils.load_model(src)
    args = ModelArgs.from_dict(json.loads((dst / "config.json").read_text()))
    with load_engine(dst, RuntimeConfig(cache_bytes=minimum_cache_bytes(open_packed(dst), args))) as engine:
        got = _logits(engine, PROMPT, 8)
    want = _logits(SimpleNamespace(model=ref), PROMPT, 8)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.abs(g - w).max() < 1e-4, (
            f"{preset}: step {step} differs from mlx-lm by {np.abs(g - w).max()}"
        )


def test_a_wrong_slot_would_be_caught(packed, resident_logits):
    """The comparison above can fail: corrupting one cached expert changes the logits."""
    _, dst = packed("tiny")
    with load_engine(dst, RuntimeConfig(cache_experts=64)) as engine:
        _logits(engine, PROMPT, 0)  # warm the cache
        pool = engine.runtime.cache.pool(0)
        for slot in range(pool.slots):
            buf = pool.buffers(slot)[0]
            buf[:] = bytes(len(buf))  # zero gate_proj.weight of every cached layer-0 expert
        got = _logits(engine, PROMPT, 0)
    assert not np.array_equal(got[0], resident_logits("tiny")[0])


def test_read_fault_gives_a_clear_error_and_the_engine_recovers(packed, resident_logits):
    _, dst = packed("tiny")
    with load_engine(dst, RuntimeConfig(cache_experts=4)) as engine:
        calls = {"n": 0}

        def fault(layer, expert):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(5, "Input/output error")

        engine.runtime.store.fault = fault
        with pytest.raises(StreamerError, match=r"layer \d+ expert \d+"):
            _logits(engine, PROMPT, 0)
        assert engine.runtime.cache.pinned_count() == 0
        engine.runtime.store.fault = None
        got = _logits(engine, PROMPT, 8)
    for g, w in zip(got, resident_logits("tiny"), strict=True):
        assert np.array_equal(g, w)


def test_checkpoint_without_repack_says_what_to_do(packed):
    src, _ = packed("tiny")
    with pytest.raises(StreamerError, match="streamer repack"):
        load_engine(src)


def test_preload_fills_the_cache_and_then_every_lookup_hits(packed, resident_logits):
    _, dst = packed("tiny")
    with load_engine(dst, RuntimeConfig(cache_experts=1000)) as engine:
        loaded = engine.runtime.preload()
        assert loaded == 16 * 4  # every expert of every layer
        got = _logits(engine, PROMPT, 4)
        stats = engine.stats()
    assert stats["cache_misses"] == 0 and stats["cache_hits"] > 0
    for g, w in zip(got, resident_logits("tiny")[:5], strict=True):
        assert np.array_equal(g, w)


def test_a_miss_never_evicts_an_expert_the_same_step_hits(packed):
    """Hits are pinned before misses allocate: with 4 slots holding 5,1,2,3, asking for [0, 5] hits 5."""
    _, dst = packed("tiny")
    with load_engine(dst, RuntimeConfig(cache_experts=4)) as engine:
        rt = engine.runtime
        assert rt.cache.pool(0).slots == 4
        for e in (5, 1, 2, 3):
            rt.release(0, rt.acquire(0, [e]))
        rt.stats.reset()
        rt.release(0, rt.acquire(0, [0, 5]))
        assert (rt.stats.hits, rt.stats.misses) == (1, 1)
        assert (0, 5) in rt.cache and (0, 0) in rt.cache and (0, 1) not in rt.cache


def test_cgroup_limit_files_follow_this_process_group(tmp_path):
    from streamer.experts.budget import _cgroup_limit_files

    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu,cpuacct:/other\n9:memory:/user/job\n0::/unified/job\n")
    files = _cgroup_limit_files(str(proc), "/sys/fs/cgroup")
    assert files[:3] == [
        "/sys/fs/cgroup/memory/user/job/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/user/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    assert "/sys/fs/cgroup/unified/job/memory.max" in files
    assert not any("other" in f for f in files)
