"""The bookkeeping of one slot pool, without the memory: which expert is in which slot, free slots, pins,
and the eviction policy. ``ExpertCache`` keeps one per pool next to the pool's arrays; the simulator in
``tuning/cache_sim`` drives the same class, so both count the same hits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from streamer.experts.policy import Key, NoVictimError, make_policy


class CacheFullError(RuntimeError):
    """Every slot of a pool is pinned: the budget cannot hold what one step needs."""


class SlotBook:
    """Slots ``0 .. slots-1`` of one pool: free, being filled (pinned, not yet committed), or holding a
    committed expert (pinned while a step uses it)."""

    def __init__(self, slots: int, policy: str = "lru"):
        self.slots = slots
        self.policy = make_policy(policy, slots)
        self.free = list(range(slots))
        self._pins: Counter = Counter()  # slot -> pin count

    def __contains__(self, key: Key) -> bool:
        return key in self.policy

    def __len__(self) -> int:
        """Slots holding committed experts."""
        return len(self.policy)

    def items(self) -> Iterator[tuple[Key, int]]:
        """(key, slot) of every committed expert, without counting a use."""
        return self.policy.items()

    def lookup(self, key: Key) -> int | None:
        """The slot holding ``key`` (a use, for the policy); None on a miss."""
        return self.policy.get(key)

    def allocate(self) -> tuple[int, bool]:
        """A pinned slot to fill: a free one, else the policy's victim. Returns (slot, evicted).

        Raises:
            CacheFullError: every slot is pinned.
        """
        if self.free:
            slot, evicted = self.free.pop(), False
        else:
            try:
                _, slot = self.policy.evict(lambda s: self._pins[s] > 0)
            except NoVictimError:
                raise CacheFullError(
                    f"all {self.slots} expert slots are in use by the current step; "
                    "raise --cache-gb (the cache must hold at least one layer's top-k experts)"
                ) from None
            evicted = True
        self._pins[slot] += 1
        return slot, evicted

    def commit(self, key: Key, slot: int) -> None:
        """``slot`` now holds ``key`` (a use). It stays pinned until ``unpin``."""
        self.policy.add(key, slot)

    def abort(self, slot: int) -> None:
        """Returns a slot whose fill failed to the free list."""
        self.unpin(slot)
        self.free.append(slot)

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self._pins[slot] > 0, f"slot {slot} unpinned more often than pinned"
        self._pins[slot] -= 1
        if not self._pins[slot]:
            del self._pins[slot]

    @property
    def pinned(self) -> int:
        return len(self._pins)
