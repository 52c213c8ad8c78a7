"""Eviction policies: which committed expert leaves a full slot pool. One implementation serves the runtime's
``ExpertCache`` and the simulator in ``tuning/cache_sim`` alike, so a simulated hit rate is the runtime's.

A policy maps keys ``(layer, expert)`` to slots for the experts a pool holds, hears every use (``get`` on a
hit, ``add`` when a read commits) and names a victim among the unpinned entries when a miss needs a slot.
Every operation costs O(1) (LRU) or O(log slots) (LFU): nothing scans the pool, whatever its size.

- ``lru``: least recently used. Pinned entries met on the way to a victim become most recently used (they
  are in use by the current step).
- ``lfu``: least frequently used with aging. Each use adds a weight that doubles every ``half_life`` uses
  of the pool, so a use ``half_life`` ago counts half of one now: popular experts stay, a burst fades.
  Counts outlive eviction, so an expert that was popular before comes back ahead of one-off guests.
  Ties go to the least recently used.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu")
DEFAULT_POLICY = "lfu"
# LFU's default half-life, in pool capacities: a use this many pool-fulls of uses ago weighs half. Chosen
# on the trained demo's held-out routing (benchmarks/bench_policy_choice.py): 8-16 best, 16 at 10 % cache.
LFU_HALF_LIFE_CAPACITIES = 16.0


class NoVictimError(RuntimeError):
    """Every committed entry of the pool is pinned."""


class LRUPolicy:
    """Least recently used."""

    name = "lru"

    def __init__(self, capacity: int):
        self._order: OrderedDict[Key, int] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def items(self) -> Iterator[tuple[Key, int]]:
        return iter(self._order.items())

    def get(self, key: Key) -> int | None:
        """The slot of ``key``, counting a use; None when the pool does not hold it."""
        slot = self._order.get(key)
        if slot is not None:
            self._order.move_to_end(key)
        return slot

    def add(self, key: Key, slot: int) -> None:
        """``key`` now lives in ``slot`` (a use)."""
        self._order[key] = slot
        self._order.move_to_end(key)

    def evict(self, pinned: Callable[[int], bool]) -> tuple[Key, int]:
        """Removes and returns the victim: the least recently used entry whose slot is not pinned."""
        skipped = []
        try:
            while self._order:
                key, slot = self._order.popitem(last=False)
                if not pinned(slot):
                    return key, slot
                skipped.append((key, slot))
            raise NoVictimError
        finally:
            for key, slot in skipped:  # in use by the current step: now the most recently used
                self._order[key] = slot


class LFUPolicy:
    """Least frequently used, with exponential aging (see the module doc)."""

    name = "lfu"

    def __init__(self, capacity: int, half_life: float | None = None):
        self.half_life = half_life or max(1.0, LFU_HALF_LIFE_CAPACITIES * capacity)
        self._slots: dict[Key, int] = {}
        self._score: dict[Key, float] = {}  # every key ever used, cached or not
        self._last: dict[Key, int] = {}
        self._heap: list[tuple[float, int, Key]] = []  # (score, last use, key); stale entries skipped
        self._clock = itertools.count()
        self._uses = 0
        self._log_weight = 0.0  # log2 of the current use weight

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Key) -> bool:
        return key in self._slots

    def items(self) -> Iterator[tuple[Key, int]]:
        return iter(self._slots.items())

    def get(self, key: Key) -> int | None:
        slot = self._slots.get(key)
        if slot is not None:
            self._use(key)
        return slot

    def add(self, key: Key, slot: int) -> None:
        self._slots[key] = slot
        self._use(key)

    def evict(self, pinned: Callable[[int], bool]) -> tuple[Key, int]:
        skipped = []
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                score, last, key = entry
                if key not in self._slots or self._score[key] != score or self._last[key] != last:
                    continue  # stale: the key was used again or left the pool
                if pinned(self._slots[key]):
                    skipped.append(entry)
                    continue
                return key, self._slots.pop(key)
            raise NoVictimError
        finally:
            for entry in skipped:
                heapq.heappush(self._heap, entry)

    def _use(self, key: Key) -> None:
        self._uses += 1
        self._log_weight = self._uses / self.half_life
        if self._log_weight > 512:  # keep scores in float range: rescale everything (rare)
            self._rescale()
        score = self._score.get(key, 0.0) + 2.0**self._log_weight
        last = next(self._clock)
        self._score[key], self._last[key] = score, last
        heapq.heappush(self._heap, (score, last, key))
        if len(self._heap) > 4 * max(len(self._slots), 16):  # drop stale entries now and then
            self._heap = [(self._score[k], self._last[k], k) for k in self._slots]
            heapq.heapify(self._heap)

    def _rescale(self) -> None:
        factor = 2.0**-self._log_weight
        self._score = {k: s * factor for k, s in self._score.items() if s * factor > 1e-300}
        self._uses = 0
        self._log_weight = 0.0
        self._heap = [(self._score.get(k, 0.0), self._last[k], k) for k in self._slots]
        for k in self._slots:
            self._score.setdefault(k, 0.0)
        heapq.heapify(self._heap)


def make_policy(name: str, capacity: int) -> LRUPolicy | LFUPolicy:
    """The policy called ``name`` (``--cache-policy``) for a pool of ``capacity`` slots."""
    if name == "lru":
        return LRUPolicy(capacity)
    if name == "lfu":
        return LFUPolicy(capacity)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
