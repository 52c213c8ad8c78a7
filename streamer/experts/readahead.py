"""Read-ahead: the decision to read a layer's experts *before* it routes (``--prefetch predict``).

The runtime guesses the next layer's experts by applying that layer's router to the current hidden
state; ``ReadAhead`` starts those reads in free or evictable slots, hands a guessed read to the step
that routes to it (``take``), frees the guesses it did not use (``settle``) and scores the guesses.
It never takes a slot the step it runs ahead of needs: ``reserve_slots`` stay free for that step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future

log = logging.getLogger(__name__)


class ReadAhead:
    """Reads started ahead of need, keyed (layer, expert) -> (slot pinned for it, its read).

    ``runtime`` is the ``ExpertRuntime`` that owns this object (its cache, readers, stats and timeout);
    it is not imported here, so the dependency points one way.
    """

    def __init__(self, runtime, reserve_slots: int):
        self.runtime = runtime
        self.reserve_slots = reserve_slots
        self._reads: dict[tuple[int, int], tuple[int, Future]] = {}
        self._guesses: dict[int, set[int]] = {}  # layer -> experts guessed for it

    def guess(self, layer: int, experts: Sequence[int]) -> None:
        """Records a guess of ``layer``'s experts (scored when it routes) and starts reading it."""
        self._guesses[layer] = set(experts)
        self.start(layer, experts)

    def start(self, layer: int, experts: Sequence[int]) -> None:
        """Starts reading ``experts`` of ``layer`` in free or evictable slots, keeping the reserve free."""
        rt = self.runtime
        cache, pool = rt.cache, rt.cache.pool(layer)
        for e in experts:
            key = (layer, e)
            if key in self._reads or key in cache or rt.is_orphaned(layer, e):
                continue
            if pool.slots - cache.pinned_count_in(layer) <= self.reserve_slots:
                return
            slot = cache.allocate(layer, e)
            self._reads[key] = (slot, rt.readers.submit(layer, e, pool.buffers(slot)))
            rt.stats.prefetch_issued += 1

    def take(self, layer: int, expert: int) -> tuple[int, Future] | None:
        """The read started ahead for (layer, expert), now the caller's (its slot is pinned), or None."""
        read = self._reads.pop((layer, expert), None)
        if read is not None:
            self.runtime.stats.prefetch_used += 1
        return read

    def score(self, layer: int, experts: Sequence[int]) -> None:
        """Counts how many of ``layer``'s guessed experts it then routed to."""
        guess = self._guesses.pop(layer, None)
        if guess is not None:
            self.runtime.stats.predicted += len(guess)
            self.runtime.stats.predicted_right += len(guess & set(experts))

    def settle(self, layer: int, keep: set[int]) -> None:
        """Commits this layer's finished reads that the step does not need and unpins them."""
        rt = self.runtime
        for key in [k for k in self._reads if k[0] == layer and k[1] not in keep]:
            slot, fut = self._reads.pop(key)
            try:
                fut.result(timeout=rt.io_timeout_s)
            except Exception as e:  # noqa: BLE001 - a failed guess costs nothing but its slot
                log.warning("prefetch of layer %d expert %d failed: %s", layer, key[1], e or "timed out")
                rt.free_when_done(layer, key[1], slot, fut)
                continue
            rt.cache.commit(layer, key[1], slot)
            rt.cache.unpin(layer, [slot])
