"""Eviction policies (experts/policy.py): hand-checked cases, and LFU-with-aging against a slow reference
that recomputes every score from the whole history at each eviction."""

from __future__ import annotations

import random

import pytest

from streamer.experts.policy import LFUPolicy, LRUPolicy, NoVictimError, make_policy

NOT_PINNED = lambda slot: False  # noqa: E731


def _fill(policy, keys):
    for slot, key in enumerate(keys):
        policy.add(key, slot)


def test_lru_evicts_least_recent_and_pinned_entries_become_most_recent():
    lru = LRUPolicy(3)
    _fill(lru, [(0, 1), (0, 2), (0, 3)])
    lru.get((0, 1))  # 2 is now least recently used
    assert lru.evict(NOT_PINNED) == ((0, 2), 1)
    # 3 (slot 2) is pinned: skipped, and it becomes the most recent, so 1 goes next, then 3.
    assert lru.evict(lambda slot: slot == 2) == ((0, 1), 0)
    assert lru.evict(NOT_PINNED) == ((0, 3), 2)
    with pytest.raises(NoVictimError):
        lru.evict(NOT_PINNED)


def test_lfu_keeps_the_popular_expert_through_a_burst_of_one_offs():
    lfu = LFUPolicy(2, half_life=1000)
    lfu.add((0, 1), 0)
    for _ in range(5):
        lfu.get((0, 1))
    lfu.add((0, 2), 1)
    assert lfu.evict(NOT_PINNED) == ((0, 2), 1)  # used once, 1 six times
    lfu.add((0, 3), 1)
    assert lfu.evict(NOT_PINNED) == ((0, 3), 1)


def test_lfu_ages_old_popularity_away():
    # Expert 1 was used 8 times long ago; expert 2 three times just now. With a half-life of 2 uses,
    # 1's old uses weigh almost nothing: 2 is the one to keep.
    lfu = LFUPolicy(2, half_life=2)
    lfu.add((0, 1), 0)
    for _ in range(7):
        lfu.get((0, 1))
    lfu.add((0, 2), 1)
    for _ in range(2):
        lfu.get((0, 2))
    assert lfu.evict(NOT_PINNED) == ((0, 1), 0)
    # Without aging (a huge half-life) the old count wins.
    lfu = LFUPolicy(2, half_life=1e9)
    _fill(lfu, [(0, 1)])
    for _ in range(7):
        lfu.get((0, 1))
    lfu.add((0, 2), 1)
    lfu.get((0, 2))
    assert lfu.evict(NOT_PINNED) == ((0, 2), 1)


def test_lfu_counts_survive_eviction_and_ties_go_to_least_recent():
    lfu = LFUPolicy(1, half_life=1e9)
    lfu.add((0, 5), 0)
    lfu.get((0, 5))
    assert lfu.evict(NOT_PINNED) == ((0, 5), 0)
    lfu.add((0, 6), 0)
    lfu.add((0, 5), 1)  # back: its two earlier uses still count
    assert lfu.evict(NOT_PINNED) == ((0, 6), 0)
    lfu = LFUPolicy(2, half_life=1e9)
    _fill(lfu, [(0, 7), (0, 8)])  # one use each: the older goes first
    assert lfu.evict(NOT_PINNED) == ((0, 7), 0)


def test_lfu_never_evicts_a_pinned_slot():
    lfu = LFUPolicy(2, half_life=1e9)
    _fill(lfu, [(0, 1), (0, 2)])
    lfu.get((0, 2))
    assert lfu.evict(lambda slot: slot == 0) == ((0, 2), 1)
    with pytest.raises(NoVictimError):
        lfu.evict(lambda slot: True)
    assert (0, 1) in lfu  # a refused eviction changes nothing


class _SlowLFU:
    """Every use at time t weighs 2 ** (t / half_life); the victim has the least total among unpinned
    cached keys, ties to the least recently used. Recomputed from the full history every time."""

    def __init__(self, half_life):
        self.half_life, self.history, self.slots = half_life, [], {}

    def use(self, key):
        self.history.append(key)

    def victim(self, pinned):
        score = {}
        last = {}
        for t, key in enumerate(self.history, start=1):
            score[key] = score.get(key, 0.0) + 2.0 ** (t / self.half_life)
            last[key] = t
        candidates = [k for k, s in self.slots.items() if not pinned(s)]
        return min(candidates, key=lambda k: (score[k], last[k]))


@pytest.mark.parametrize("seed", range(6))
def test_lfu_matches_the_slow_reference_on_random_streams(seed):
    rng = random.Random(seed)
    capacity, half_life = rng.choice([2, 4, 8]), rng.choice([3.0, 10.0, 50.0])
    fast, slow = LFUPolicy(capacity, half_life=half_life), _SlowLFU(half_life)
    free = list(range(capacity))
    popular = [rng.randrange(30) for _ in range(5)]
    for _ in range(400):
        key = (0, rng.choice(popular) if rng.random() < 0.6 else rng.randrange(30))
        if fast.get(key) is not None:
            slow.use(key)
            continue
        if free:
            slot = free.pop()
        else:
            pinned_slot = rng.randrange(capacity) if rng.random() < 0.3 else -1
            want = slow.victim(lambda s, p=pinned_slot: s == p)
            got, slot = fast.evict(lambda s, p=pinned_slot: s == p)
            assert got == want
            del slow.slots[got]
        fast.add(key, slot)
        slow.slots[key] = slot
        slow.use(key)


def test_lfu_rescales_without_changing_decisions():
    # A tiny half-life drives the weights past 2**512 many times over: scores are rescaled, not overflowed.
    lfu = LFUPolicy(3, half_life=0.5)
    _fill(lfu, [(0, 1), (0, 2), (0, 3)])
    for i in range(2000):
        lfu.get((0, 1 + i % 2))  # 1 and 2 stay hot, 3 goes cold
    assert lfu.evict(NOT_PINNED) == ((0, 3), 2)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; choose one of lru, lfu"):
        make_policy("fifo", 4)
