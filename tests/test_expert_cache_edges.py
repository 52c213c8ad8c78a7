"""Edges of the expert cache's pieces that mutation testing found unguarded (tools/mutation.py slot_book
policy expert_cache): pin counting, the full-pool error, the budget split, slot dtypes."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.experts.expert_cache import (
    Component,
    ExpertCache,
    _widen,
    block_shape,
    plan_slots,
    slot_dtype,
)
from streamer.experts.policy import LFUPolicy, LRUPolicy, make_policy
from streamer.experts.slot_book import CacheFullError, SlotBook
from tests.test_expert_cache import G, H, I, _shape

NOT_PINNED = lambda slot: False  # noqa: E731


def _commit_all(book, keys):
    slots = {}
    for key in keys:
        slot, evicted = book.allocate()
        assert not evicted
        book.commit(key, slot)
        book.unpin(slot)
        slots[key] = slot
    return slots


# ---------------------------------------------------------------------------------------------------------
# SlotBook


def test_slot_book_defaults_to_lru():
    book = SlotBook(2)
    slots = _commit_all(book, [(0, 1), (0, 2)])
    assert book.lookup((0, 1)) == slots[(0, 1)]  # (0, 2) is now the least recently used
    assert book.allocate() == (slots[(0, 2)], True)


def test_pins_nest_and_a_slot_is_evictable_only_when_every_pin_is_gone():
    book = SlotBook(1)
    (slot,) = _commit_all(book, [(0, 1)]).values()
    book.pin(slot)
    book.pin(slot)
    assert book.pinned == 1
    book.unpin(slot)
    with pytest.raises(CacheFullError):  # still pinned once
        book.allocate()
    book.unpin(slot)
    assert book.pinned == 0
    assert book.allocate() == (slot, True)


def test_unpinning_an_unpinned_slot_is_an_error():
    book = SlotBook(2)
    (slot,) = _commit_all(book, [(0, 1)]).values()
    with pytest.raises(AssertionError, match=f"slot {slot} unpinned more often than pinned"):
        book.unpin(slot)


def test_pinned_counts_slots_not_pins_and_drops_to_zero():
    book = SlotBook(3)
    a, _ = book.allocate()
    b, _ = book.allocate()
    book.pin(a)
    assert book.pinned == 2
    book.unpin(a)
    book.unpin(a)
    book.unpin(b)
    assert book.pinned == 0


def test_full_pool_error_says_how_many_slots_and_what_to_do():
    book = SlotBook(2)
    book.allocate()
    book.allocate()
    want = (
        r"^all 2 expert slots are in use by the current step; raise --cache-gb "
        r"\(the cache must hold at least one layer's top-k experts\)$"
    )
    with pytest.raises(CacheFullError, match=want):
        book.allocate()


# ---------------------------------------------------------------------------------------------------------
# Policies


def test_make_policy_by_name_and_lfu_half_life_scales_with_capacity():
    assert isinstance(make_policy("lru", 4), LRUPolicy)
    lfu = make_policy("lfu", 4)
    assert isinstance(lfu, LFUPolicy) and lfu.half_life == 64.0  # 16 pool capacities of uses
    assert LFUPolicy(10).half_life == 160.0


@pytest.mark.parametrize("policy", [LRUPolicy(3), LFUPolicy(3)])
def test_membership_and_items_without_counting_a_use(policy):
    policy.add((0, 1), 0)
    policy.add((1, 2), 2)
    assert (0, 1) in policy and (1, 2) in policy and (0, 2) not in policy
    assert sorted(policy.items()) == [((0, 1), 0), ((1, 2), 2)]
    assert sorted(policy.items()) == [((0, 1), 0), ((1, 2), 2)]  # reading them twice changes nothing
    assert policy.evict(NOT_PINNED) == ((0, 1), 0)


class _RelativeLFU:
    """LFU with aging recomputed from each key's use times at every eviction, every weight taken relative
    to now (2 ** ((t - now) / half_life)) so it never overflows however long the stream: what the fast
    policy's rescaling must reproduce."""

    def __init__(self, half_life):
        self.half_life, self.now, self.uses, self.slots = half_life, 0, {}, {}

    def use(self, key):
        self.now += 1
        self.uses.setdefault(key, []).append(self.now)

    def victim(self, pinned):
        def rank(key):
            times = self.uses[key]
            return sum(2.0 ** ((t - self.now) / self.half_life) for t in times), times[-1]

        return min((k for k, s in self.slots.items() if not pinned(s)), key=rank)


@pytest.mark.parametrize("seed", range(3))
def test_lfu_matches_the_relative_reference_across_a_rescale(seed):
    # half_life 16: the use weight passes 2**512 after 8,192 uses and every score is rescaled. A burn-in
    # of one hot key brings the stream there; the random stream after it crosses the rescale with
    # popularity (the last ~50 half-lives of uses) that must carry over exactly.
    rng = random.Random(seed)
    capacity, half_life = 4, 16.0
    fast, slow = LFUPolicy(capacity, half_life=half_life), _RelativeLFU(half_life)
    free = list(range(capacity))
    popular = [rng.randrange(12) for _ in range(4)]
    stream = [(1, 0)] * 7900 + [
        (0, rng.choice(popular) if rng.random() < 0.6 else rng.randrange(60)) for _ in range(700)
    ]
    for key in stream:
        if fast.get(key) is None:
            if free:
                slot = free.pop()
            else:
                pinned_slot = rng.randrange(capacity) if rng.random() < 0.3 else -1
                got, slot = fast.evict(lambda s, p=pinned_slot: s == p)
                assert got == slow.victim(lambda s, p=pinned_slot: s == p)
                del slow.slots[got]
            fast.add(key, slot)
            slow.slots[key] = slot
        slow.use(key)


def test_lfu_forgotten_scores_tie_and_the_least_recent_goes():
    # A = (0, 5) (3 uses) outscores B = (0, 4) (1 use, later); then 2 x 2,049 uses of C rescale twice and
    # push both below 1e-300, where scores are forgotten (0): tied, the least recently used, A, goes
    # first (not the smaller key, B).
    lfu = LFUPolicy(3, half_life=4.0)
    lfu.add((0, 5), 0)
    lfu.get((0, 5))
    lfu.get((0, 5))
    lfu.add((0, 4), 1)
    lfu.add((0, 3), 2)
    for _ in range(2 * 2049):
        lfu.get((0, 3))
    assert lfu.evict(NOT_PINNED) == ((0, 5), 0)
    assert lfu.evict(NOT_PINNED) == ((0, 4), 1)


def test_lfu_popularity_carries_across_a_rescale_exactly():
    # half_life 16: use 8,193 is the first whose weight passes 2**512, and it rescales every score.
    # Weights below are relative to that use (2 ** ((t - 8193) / 16)), computed by hand.
    Z, A, B = (0, 0), (0, 1), (0, 2)
    lfu = LFUPolicy(3, half_life=16.0)
    lfu.add(Z, 0)
    for _ in range(8130):  # uses 2..8131
        lfu.get(Z)
    lfu.add(A, 1)  # use 8132: 2 ** (-61 / 16) = 0.0711
    for _ in range(60):  # uses 8133..8192
        lfu.get(Z)
    lfu.get(A)  # use 8193, the rescale: weight 1; A = 1.0711
    lfu.add(B, 2)  # use 8194: 2 ** (1 / 16) = 1.0443 < A
    assert lfu.evict(lambda slot: slot == 0) == (B, 2)

    # Two cold keys, both well below the current use's weight: A = (0, 1) 3 uses, B = (0, 2) 1 later use.
    lfu = LFUPolicy(3, half_life=16.0)
    lfu.add(Z, 0)
    for _ in range(8139):  # uses 2..8140
        lfu.get(Z)
    lfu.add(A, 1)  # uses 8141-8143: 2 ** (-52/16) + 2 ** (-51/16) + 2 ** (-50/16) = 0.330
    lfu.get(A)
    lfu.get(A)
    for _ in range(10):  # uses 8144..8153
        lfu.get(Z)
    lfu.add(B, 2)  # use 8154: 2 ** (-39/16) = 0.184 < A, though more recent
    for _ in range(39):  # uses 8155..8193: the rescale
        lfu.get(Z)
    assert lfu.evict(lambda slot: slot == 0) == (B, 2)


# ---------------------------------------------------------------------------------------------------------
# ExpertCache, SlotPool, slot dtypes


def _block(activation=None, scales="BF16"):
    comps = [("gate_proj.weight", "U32", (I, H * 4 // 32)), ("gate_proj.scales", scales, (I, H // G))]
    return block_shape(comps, activation)


def _expert_cache(slots, layers=2, experts=4, policy="lru", shape=None):
    shape = shape or _block()
    layer_shapes = {layer: shape for layer in range(layers)}
    budget = slots * shape.nbytes
    return ExpertCache(layer_shapes, {layer: experts for layer in range(layers)}, budget, 1, policy)


def _fill(cache, layer, expert):
    slot = cache.allocate(layer, expert)
    cache.commit(layer, expert, slot)
    cache.unpin(layer, [slot])
    return slot


@pytest.mark.parametrize(
    "stored, activation, held",
    [
        ("BF16", None, "BF16"),
        ("BF16", mx.float32, "F32"),
        ("F16", mx.float32, "F32"),
        ("BF16", mx.bfloat16, "BF16"),
        ("F32", mx.bfloat16, "F32"),  # never narrowed
        ("U32", mx.float32, "U32"),  # packed weights are not floats
        ("U8", mx.bfloat16, "U8"),
    ],
)
def test_slot_dtype_is_the_promoted_float_type(stored, activation, held):
    assert slot_dtype(stored, activation) == held


def test_block_shape_holds_widened_floats_and_counts_memory_bytes():
    shape = _block(mx.float32)
    assert shape.components == (
        Component("gate_proj.weight", "U32", (I, H // 8), "U32"),
        Component("gate_proj.scales", "BF16", (I, H // G), "F32"),
    )
    weight_bytes, scale_elems = I * H // 8 * 4, I * H // G
    assert shape.nbytes == weight_bytes + 4 * scale_elems  # in memory: f32 scales
    assert shape.components[1].stored_nbytes == 2 * scale_elems  # on disk: bf16


def test_plan_error_names_budget_and_need_in_megabytes():
    huge = block_shape([("w", "U8", (10**6, 10**5))])  # 1e11 bytes: one slot is 100,000 MB
    with pytest.raises(ConfigError) as err:
        plan_slots({0: huge}, {0: 4}, 150_000_000_000, 2)
    assert str(err.value) == (
        "an expert cache of 150000.0 MB cannot hold one layer's top-2 experts (200000.0 MB needed); "
        "raise --cache-gb or --cache-experts"
    )


def test_cache_uses_the_policy_it_is_given():
    lfu = _expert_cache(slots=2, layers=1, policy="lfu")
    assert lfu.policy == "lfu"
    a = _fill(lfu, 0, 0)
    for _ in range(5):
        lfu.lookup(0, 0)
    _fill(lfu, 0, 1)  # the most recent, but used once
    assert lfu.allocate(0, 2) != a  # LFU keeps expert 0; LRU would have evicted it
    assert (0, 0) in lfu and (0, 1) not in lfu


def test_all_resident_counts_every_layer_sharing_a_pool():
    cache = _expert_cache(slots=4, layers=2, experts=2)
    for layer, expert in ((0, 0), (0, 1), (1, 0)):
        _fill(cache, layer, expert)
        assert not cache.all_resident
    _fill(cache, 1, 1)
    assert cache.all_resident


def test_generation_never_repeats_and_evictions_count():
    cache = _expert_cache(slots=2, layers=1)
    seen = [cache.generation]

    def changed():
        assert cache.generation not in seen, (cache.generation, seen)
        seen.append(cache.generation)

    _fill(cache, 0, 0)
    changed()
    slot = cache.allocate(0, 1)
    cache.abort(0, slot)  # a failed read: the slot goes back, the contents changed again
    changed()
    _fill(cache, 0, 1)
    changed()
    assert cache.evictions == 0
    cache.allocate(0, 2)  # evicts expert 0
    changed()
    slot = cache.allocate(0, 3)  # evicts expert 1
    changed()
    assert cache.evictions == 2
    cache.commit(0, 3, slot)
    changed()


def test_slot_table_resident_experts_and_pin_counts():
    cache = _expert_cache(slots=3, layers=2, experts=4)
    s02 = _fill(cache, 0, 2)
    s11 = _fill(cache, 1, 1)
    s00 = _fill(cache, 0, 0)
    assert cache.slot_table(0, 4).tolist() == [s00, -1, s02, -1]
    assert cache.slot_table(0, 4).dtype == np.int32
    assert cache.slot_table(1, 4).tolist() == [-1, s11, -1, -1]
    assert cache.resident_experts(0) == [0, 2] and cache.resident_experts(1) == [1]
    assert cache.pool(0).slots == 3 and cache.used_slots(1) == 3
    cache.pin(0, [s00, s02])
    cache.pin(1, [s00])  # layers 0 and 1 share one pool: the same slot, pinned twice
    assert cache.pinned_count() == 2 and cache.pinned_count_in(1) == 2
    cache.unpin(0, [s00])
    assert cache.pinned_count() == 2
    cache.unpin(1, [s00, s02])
    assert cache.pinned_count() == 0


def test_layers_in_separate_pools_count_pins_apart():
    s4, s8 = _shape(4), _shape(8)
    cache = ExpertCache({0: s4, 1: s8}, {0: 4, 1: 4}, 2 * s4.nbytes + 2 * s8.nbytes, 1)
    a = _fill(cache, 0, 0)
    cache.pin(0, [a])
    assert cache.pinned_count() == 1 and cache.pinned_count_in(0) == 1 and cache.pinned_count_in(1) == 0


@pytest.mark.parametrize("stored, dtype", [("BF16", mx.bfloat16), ("F16", mx.float16)])
def test_slot_read_widens_scales_exactly_and_fills_weights_in_place(stored, dtype):
    cache = _expert_cache(slots=2, layers=1, shape=_block(mx.float32, scales=stored))
    pool = cache.pool(0)
    rng = np.random.default_rng(1)
    weight = rng.integers(0, 2**32, size=(I, H // 8), dtype=np.uint32)
    scales = mx.array(rng.standard_normal((I, H // G)).astype(np.float32)).astype(dtype)
    scale_bytes = np.array(scales.view(mx.uint16)).tobytes()
    slot = cache.allocate(0, 0)

    def fill(buffers):
        assert [len(b) for b in buffers] == [weight.nbytes, len(scale_bytes)]  # stored sizes
        buffers[0][:] = weight.tobytes()
        buffers[1][:] = scale_bytes
        return weight.nbytes + len(scale_bytes)

    assert pool.buffers(slot).read(fill) == weight.nbytes + len(scale_bytes)
    assert np.array_equal(np.array(pool.arrays["gate_proj.weight"][slot]), weight)
    held = pool.arrays["gate_proj.scales"][slot]
    assert held.dtype == mx.float32
    assert mx.array_equal(held, scales.astype(mx.float32)).item()  # MLX's own widening as reference


def test_widen_refuses_what_result_type_never_asks_for():
    raw = np.zeros(8, np.uint8)
    dst = np.zeros(4, np.uint32)
    with pytest.raises(ValueError, match="^cannot hold BF16 as F16$"):
        _widen(raw, "BF16", dst, "F16")
    with pytest.raises(ValueError, match="^cannot widen U32 to F32$"):
        _widen(raw, "U32", dst, "F32")
