"""ExpertCache and ReaderPool, each alone: slot bookkeeping, budget, pinning, zero-copy fills, dedup."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.experts.expert_cache import ExpertCache, block_shape, plan_slots
from streamer.experts.readers import ReaderPool
from streamer.experts.slot_book import CacheFullError

H, I, G = 128, 64, 64  # hidden, expert inter, group size


def _shape(bits=4, dtype="BF16"):
    comps = []
    for name, (out_dim, in_dim) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        comps += [
            (f"{name}.weight", "U32", (out_dim, in_dim * bits // 32)),
            (f"{name}.scales", dtype, (out_dim, in_dim // G)),
            (f"{name}.biases", dtype, (out_dim, in_dim // G)),
        ]
    return block_shape(comps)


def _cache(slots, layers=2, experts=8, shape=None):
    shape = shape or _shape()
    return ExpertCache(
        {l: shape for l in range(layers)}, {l: experts for l in range(layers)}, slots * shape.nbytes, 1
    )


def test_plan_slots_splits_budget_by_expert_bytes():
    small, big = _shape(bits=4), _shape(bits=8)
    plan = plan_slots(
        {0: small, 1: big, 2: big}, {0: 10, 1: 10, 2: 10}, 10 * small.nbytes + 20 * big.nbytes, 2
    )
    assert plan == {small: 10, big: 20}
    # Capped at the number of experts; floored at min_slots.
    assert plan_slots({0: small}, {0: 5}, 100 * small.nbytes, 2) == {small: 5}
    with pytest.raises(ConfigError, match="top-4"):
        plan_slots({0: small}, {0: 5}, 3 * small.nbytes, 4)


def test_lru_evicts_least_recently_used():
    cache = _cache(slots=3)
    slots = {}
    for e in (0, 1, 2):
        slots[e] = cache.allocate(0, e)
        cache.commit(0, e, slots[e])
        cache.unpin(0, [slots[e]])
    assert sorted(slots.values()) == [0, 1, 2]
    assert cache.lookup(0, 0) == slots[0]  # 0 becomes most recent; 1 is now least recent
    s = cache.allocate(0, 3)
    assert s == slots[1]
    assert (0, 1) not in cache and (0, 0) in cache and (0, 2) in cache
    assert cache.evictions == 1


def test_pinned_slots_are_never_evicted():
    cache = _cache(slots=2)
    a = cache.allocate(0, 0)
    cache.commit(0, 0, a)
    b = cache.allocate(0, 1)
    cache.commit(0, 1, b)
    cache.unpin(0, [b])  # expert 0 stays pinned (in use by the current step)
    c = cache.allocate(1, 5)
    assert c == b and (0, 0) in cache and (0, 1) not in cache
    with pytest.raises(CacheFullError, match="--cache-gb"):
        cache.allocate(1, 6)
    cache.abort(1, c)
    assert cache.allocate(1, 6) == c


def test_layers_with_different_block_shapes_get_separate_pools():
    s4, s8 = _shape(4), _shape(8)
    cache = ExpertCache({0: s4, 1: s8}, {0: 4, 1: 4}, 2 * s4.nbytes + 2 * s8.nbytes, 1)
    assert cache.pool(0) is not cache.pool(1)
    assert cache.pool(1).arrays["gate_proj.weight"].shape == (2, I, H * 8 // 32)


def test_slot_fill_is_visible_to_gather_qmm_and_exact():
    """Bytes written through the numpy views are what gather_qmm computes with, also after refills."""
    cache = _cache(slots=2, shape=_shape(dtype="F32"))
    pool = cache.pool(0)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, H), dtype=np.float32))
    for expert in range(4):  # 4 experts through 2 slots: every slot is overwritten
        w = mx.array(rng.standard_normal((I, H), dtype=np.float32))
        wq, scales, biases = mx.quantize(w, group_size=G, bits=4)
        slot = cache.allocate(0, expert)
        bufs = pool.buffers(slot)
        for buf, arr in zip(bufs[:3], (wq, scales, biases), strict=True):
            buf[:] = memoryview(np.array(arr)).cast("B")
        cache.commit(0, expert, slot)
        arrays = pool.arrays
        got = mx.gather_qmm(
            x,
            arrays["gate_proj.weight"],
            arrays["gate_proj.scales"],
            arrays["gate_proj.biases"],
            rhs_indices=mx.array([slot]),
            transpose=True,
            group_size=G,
            bits=4,
        )
        want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=G, bits=4)
        assert mx.array_equal(got.reshape(want.shape), want).item()
        cache.unpin(0, [slot])


def test_bf16_components_round_trip_through_views():
    cache = _cache(slots=1)
    pool = cache.pool(0)
    values = mx.array(np.linspace(-2, 2, I * H // G, dtype=np.float32).reshape(I, H // G)).astype(mx.bfloat16)
    pool.buffers(0)[1][:] = memoryview(np.array(values.view(mx.uint16))).cast("B")
    assert mx.array_equal(pool.arrays["gate_proj.scales"][0], values).item()


def test_prefetcher_deduplicates_inflight_reads():
    calls = []
    release = threading.Event()

    def read(layer, expert, buffers):
        calls.append((layer, expert))
        release.wait(5)
        buffers[0][:] = b"\x01" * len(buffers[0])
        return len(buffers[0])

    buf = bytearray(16)
    with ReaderPool(read, threads=2) as pf:
        f1 = pf.submit(0, 3, [memoryview(buf)])
        f2 = pf.submit(0, 3, [memoryview(buf)])
        assert f1 is f2
        release.set()
        assert f1.result(5) == 16
        deadline = time.monotonic() + 5
        while pf.inflight(0, 3) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pf.inflight(0, 3) is None
        f3 = pf.submit(0, 3, [memoryview(buf)])  # a later read of the same expert is a new read
        assert f3.result(5) == 16
    assert calls == [(0, 3), (0, 3)]
    assert bytes(buf) == b"\x01" * 16
    assert pf.bytes_read == 32


def test_prefetcher_propagates_read_errors():
    def read(layer, expert, buffers):
        raise OSError(5, "Input/output error")

    with ReaderPool(read, threads=1) as pf:
        with pytest.raises(OSError, match="Input/output"):
            pf.submit(1, 2, []).result(5)
