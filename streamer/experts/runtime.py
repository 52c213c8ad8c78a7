"""The expert runtime: maps a layer's routed experts to cache slots, reading misses through the readers.

Slots hold float components in ``mx.result_type(activation dtype, stored dtype)`` (see expert_cache's
module doc for why and what it costs); readers widen them once per read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from streamer.experts.expert_cache import BlockShape, Component, ExpertCache, slot_dtype
from streamer.experts.policy import DEFAULT_POLICY
from streamer.experts.readahead import ReadAhead
from streamer.experts.readers import ReaderPool
from streamer.experts.store import ExpertReadTimeout, ExpertStore
from streamer.models.load import default_dtype
from streamer.storage.packed import PackedModel
from streamer.storage.packed_format import LayerEntry

log = logging.getLogger(__name__)


@dataclass
class StreamStats:
    """Totals since the runtime started (or the last ``reset``)."""

    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    predicted: int = 0  # experts guessed for the next layer (predict mode)
    predicted_right: int = 0  # ... that the next layer then routed to
    stall_s: float = 0.0
    # Distinct-expert counts (device scalars) of multi-token all-cached steps, added to hits when read.
    pending_hits: list = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


class ExpertRuntime:
    """Store + cache + readers for one packed model; the graph-building thread calls it.

    Args:
        packed: the opened packed model.
        cache_bytes: byte budget of the expert slots.
        min_slots: the fewest slots a pool may have (the model's top-k).
        io_mode: "buffered" or "direct".
        threads: reader threads.
        io_timeout_s: longest wait for one expert read before the step fails.
        layers: the layers this runtime serves (a pipeline stage): only their pools and files; None = all.
    """

    def __init__(
        self,
        packed: PackedModel,
        cache_bytes: int,
        min_slots: int,
        io_mode: str = "buffered",
        threads: int = 8,
        io_timeout_s: float = 60.0,
        prefetch: str = "parallel",
        fault=None,
        dtype: mx.Dtype | None = None,
        verify_reads: bool = False,
        policy: str = DEFAULT_POLICY,
        layers: Sequence[int] | None = None,
    ):
        self.packed = packed
        # A pipeline stage holds only its own layers' pools and files (None: every layer).
        everything = packed.manifest.layers
        self.entries = everything if layers is None else [everything[i] for i in layers]
        self.prefetch_mode = prefetch
        self.min_slots = min_slots
        # Slots hold floats for the model's compute dtype (as the resident model's experts; see load._cast).
        self.dtype = dtype or default_dtype()
        shapes = {e.layer: block_shape_of(e, self.dtype) for e in self.entries}
        experts = {e.layer: e.num_experts for e in self.entries}
        self.cache = ExpertCache(shapes, experts, cache_bytes, min_slots, policy=policy)
        self._tables: dict[int, mx.array] = {}
        self._tables_generation = -1
        self.store = ExpertStore(packed, io_mode, fault=fault, verify=verify_reads, layers=layers)
        self.readers = ReaderPool(self._fill, threads)
        self.io_timeout_s = io_timeout_s
        self.stats = StreamStats()
        self._orphans: list[tuple[int, int, int, Future]] = []  # (layer, expert, slot, read) abandoned
        self.readahead = ReadAhead(self, reserve_slots=min_slots)
        # Called as on_route(layer, ids [tokens, K]) for every routing decision (for --trace).
        self.on_route = None

    def _fill(self, layer: int, expert: int, buffers) -> int:
        """Reader thread: reads (layer, expert) into a slot's buffers, widening components as held."""
        if hasattr(buffers, "read"):
            return buffers.read(lambda raw: self.store.read_block(layer, expert, raw))
        return self.store.read_block(layer, expert, buffers)

    def all_cached(self) -> bool:
        """Every expert of the model is in a slot (and so stays there; see ``ExpertCache.all_resident``)."""
        return not self._orphans and self.cache.all_resident

    def slot_table(self, layer: int) -> mx.array:
        """expert -> slot of ``layer`` as a device array, kept in step with the cache's contents."""
        if self._tables_generation != self.cache.generation:
            self._tables = {}
            self._tables_generation = self.cache.generation
        table = self._tables.get(layer)
        if table is None:
            entry = self.layer_entry(layer)
            table = self._tables[layer] = mx.array(
                self.cache.slot_table(layer, entry.num_experts).astype(np.uint32)
            )
        return table

    def cached_mask(self, layer: int) -> mx.array | None:
        """[E] float32, 1.0 where ``layer``'s expert is in a slot now (no use counted; for cache-aware
        routing); None when every expert of the model is cached (nothing to favour)."""
        if self.all_cached():
            return None
        E = self.layer_entry(layer).num_experts
        return mx.array(np.fromiter(((layer, e) in self.cache for e in range(E)), dtype=np.float32, count=E))

    def count_hits(self, hits) -> None:
        """Adds hits of the all-cached path: an int, or a device scalar summed when stats are read."""
        if isinstance(hits, int):
            self.stats.hits += hits
        else:
            self.stats.pending_hits.append(hits)
            if len(self.stats.pending_hits) >= 256:
                self._settle_hits()

    def _settle_hits(self) -> None:
        pending = self.stats.pending_hits
        if pending:
            self.stats.pending_hits = []
            self.stats.hits += int(mx.sum(mx.stack(pending)).item())

    def layer_entry(self, layer: int) -> LayerEntry:
        return self.packed.manifest.layers[layer]

    def acquire(self, layer: int, experts: Sequence[int]) -> dict[int, int]:
        """Pins a slot holding each of ``experts``, reading misses in parallel; returns expert -> slot."""
        slots, pending = self.begin(layer, experts)
        self.finish(layer, slots, pending)
        return slots

    def begin(self, layer: int, experts: Sequence[int]) -> tuple[dict[int, int], list]:
        """Pins hits and starts reading misses; returns (expert -> slot, pending reads for ``finish``).

        The caller may compute with the hits' slots before calling ``finish``.
        """
        self._reclaim()
        self.readahead.score(layer, experts)
        self.readahead.settle(layer, keep=set(experts))
        slots: dict[int, int] = {}
        pending: list[tuple[int, int, Future]] = []
        pool = self.cache.pool(layer)
        try:
            # Hits first: pinned before any miss allocates, so a miss never evicts an expert this step uses.
            misses = []
            for e in experts:
                if (ahead := self.readahead.take(layer, e)) is not None:
                    slot, fut = ahead  # read ahead: already pinned, maybe still reading
                    pending.append((e, slot, fut))
                    self.stats.misses += 1
                    slots[e] = slot
                elif (slot := self.cache.lookup(layer, e)) is not None:
                    self.cache.pin(layer, [slot])
                    self.stats.hits += 1
                    slots[e] = slot
                else:
                    misses.append(e)
            for e in misses:
                self._check_not_stuck(layer, e)
                slot = self.cache.allocate(layer, e)
                pending.append((e, slot, self._read(layer, e, pool.buffers(slot))))
                self.stats.misses += 1
                slots[e] = slot
        except BaseException as e:
            self._abandon(layer, slots, pending, stalled=isinstance(e, ExpertReadTimeout))
            raise
        return slots, pending

    def finish(self, layer: int, slots: dict[int, int], pending: list) -> None:
        """Waits for the reads ``begin`` started; on failure every slot of the step is released (and
        ``slots`` emptied, so that a ``release`` of it afterwards is a no-op)."""
        try:
            self._wait(layer, pending)
        except BaseException as e:
            self._abandon(layer, slots, pending, stalled=isinstance(e, ExpertReadTimeout))
            slots.clear()  # all released: the caller's release() in its finally must not unpin them again
            raise

    def _read(self, layer: int, expert: int, buffers: list) -> Future:
        fut = self.readers.submit(layer, expert, buffers)
        if self.prefetch_mode == "off":
            # "off": each read is waited for before the next starts (the simple reference path); it
            # still runs on a reader thread so that the wait has a timeout.
            start = time.perf_counter()
            wait([fut], timeout=self.io_timeout_s)
            self.stats.stall_s += time.perf_counter() - start
        return fut

    def _wait(self, layer: int, pending: list[tuple[int, int, Future]]) -> None:
        start = time.perf_counter()
        timeout = 0 if self.prefetch_mode == "off" else self.io_timeout_s  # "off" waited in _read
        for e, slot, fut in pending:
            try:
                fut.result(timeout=timeout)
            except FutureTimeout:
                raise ExpertReadTimeout(
                    f"{self.packed.path / self.layer_entry(layer).file}: reading layer {layer} expert {e} "
                    f"took longer than {self.io_timeout_s:g} s (--io-timeout); is the disk still attached?"
                ) from None
            self.cache.commit(layer, e, slot)
        self.stats.stall_s += time.perf_counter() - start

    def _abandon(
        self, layer: int, slots: dict[int, int], pending: list[tuple[int, int, Future]], stalled: bool = False
    ) -> None:
        """Undoes a failed acquire: slots of failed reads are freed, hits and finished reads unpinned.

        Reads still running are waited for (up to the I/O timeout) unless the disk has stalled; one
        still running after that keeps its slot until it ends (``free_when_done``).
        """
        reads = {e: fut for e, _, fut in pending}
        running = [fut for fut in reads.values() if not fut.done()]
        if running and not stalled:
            wait(running, timeout=self.io_timeout_s)
        for e, slot in slots.items():
            fut = reads.get(e)
            if fut is None or (fut.done() and not fut.cancelled() and fut.exception() is None):
                if (layer, e) not in self.cache:
                    self.cache.commit(layer, e, slot)
                self.cache.unpin(layer, [slot])
            else:
                self.free_when_done(layer, e, slot, fut)

    def is_orphaned(self, layer: int, expert: int) -> bool:
        """True while an abandoned read of (layer, expert) still runs."""
        return any(o[0] == layer and o[1] == expert for o in self._orphans)

    def free_when_done(self, layer: int, expert: int, slot: int, fut: Future | None) -> None:
        """Frees a slot whose read failed or was abandoned; a read still running keeps it pinned until
        it ends (``_reclaim``), so a late read never writes into a slot that holds another expert."""
        if fut is not None and not fut.done():
            self._orphans.append((layer, expert, slot, fut))
            return
        self.cache.abort(layer, slot)

    def _reclaim(self) -> None:
        """Frees the slots of abandoned reads that have since ended."""
        if self._orphans:
            ended = [o for o in self._orphans if o[3].done()]
            self._orphans = [o for o in self._orphans if not o[3].done()]
            for layer, _, slot, _ in ended:
                self.cache.abort(layer, slot)

    def _check_not_stuck(self, layer: int, expert: int) -> None:
        # A new read of an expert whose abandoned read still runs would be merged with it (ReaderPool).
        if self.is_orphaned(layer, expert):
            raise ExpertReadTimeout(
                f"{self.packed.path / self.layer_entry(layer).file}: an earlier read of layer {layer} "
                f"expert {expert} has not returned after {self.io_timeout_s:g} s (--io-timeout); "
                "is the disk still attached?"
            )

    def release(self, layer: int, slots: dict[int, int]) -> None:
        self.cache.unpin(layer, slots.values())

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Starts reading ``experts`` of ``layer`` ahead of need, in free or evictable slots only."""
        self.readahead.start(layer, experts)

    def predict(self, layer: int, experts: Sequence[int]) -> None:
        """Records a guess of ``layer``'s experts (scored when it routes) and prefetches it."""
        self.readahead.guess(layer, experts)

    def preload(self) -> int:
        """Reads experts into the cache, layer by layer, until it is full; returns experts loaded."""
        loaded = 0
        for entry in self.entries:
            room = self.cache.pool(entry.layer).slots - self.cache.used_slots(entry.layer)
            todo = [e for e in range(entry.num_experts) if (entry.layer, e) not in self.cache][:room]
            for start in range(0, len(todo), self.min_slots):
                slots = self.acquire(entry.layer, todo[start : start + self.min_slots])
                self.release(entry.layer, slots)
                loaded += len(slots)
        self.stats.reset()  # preloading is set-up, not traffic of the run
        return loaded

    def preload_keys(self, keys: Sequence[tuple[int, int]], progress=None, window: int = 64) -> int:
        """Reads the (layer, expert) ``keys``, most wanted first, into free slots; returns experts loaded.

        Keys already cached are skipped, and so are keys whose pool has no free slot left for them (the
        first ones win). Reads run in parallel, ``window`` at a time; they are committed in reverse order,
        so the policy ranks the first key as the most recently and most often used: the last to be
        evicted. ``progress(done, total)`` is called after each window.
        """
        room: dict[int, int] = {}  # id(pool) -> free slots
        todo = []
        for layer, expert in keys:
            pool = self.cache.pool(layer)
            free = room.setdefault(id(pool), pool.slots - self.cache.used_slots(layer))
            if free > 0 and (layer, expert) not in self.cache:
                room[id(pool)] = free - 1
                todo.append((layer, expert))
        todo.reverse()
        for start in range(0, len(todo), window):
            pending = []
            try:
                for layer, expert in todo[start : start + window]:
                    slot = self.cache.allocate(layer, expert)
                    pending.append(
                        (layer, expert, slot, self._read(layer, expert, self.cache.pool(layer).buffers(slot)))
                    )
                while pending:
                    layer, expert, slot, fut = pending[0]
                    self._wait(layer, [(expert, slot, fut)])
                    self.cache.unpin(layer, [slot])
                    pending.pop(0)
            except BaseException:
                for layer, expert, slot, fut in pending:
                    self.free_when_done(layer, expert, slot, fut)
                raise
            if progress:
                progress(min(start + window, len(todo)), len(todo))
        self.stats.reset()  # preloading is set-up, not traffic of the run
        return len(todo)

    def close(self) -> None:
        self._reclaim()
        if self._orphans:  # a stuck read: do not wait for it, and leave its file open under it
            log.warning("%d expert read(s) never returned; closing without them", len(self._orphans))
            self.readers.close(wait=False)
            return
        self.readers.close()
        self.store.close()

    def snapshot_stats(self) -> dict:
        self._settle_hits()
        return {
            "cache_hits": self.stats.hits,
            "cache_misses": self.stats.misses,
            "bytes_read": self.readers.bytes_read,
            "stall_s": self.stats.stall_s,
            "prefetch_issued": self.stats.prefetch_issued,
            "prefetch_used": self.stats.prefetch_used,
            "predicted": self.stats.predicted,
            "predicted_right": self.stats.predicted_right,
            "cache_bytes": self.cache.capacity_bytes,
            "evictions": self.cache.evictions,
        }


def block_shape_of(entry: LayerEntry, activation: mx.Dtype | None = None) -> BlockShape:
    """A layer's slot layout for activations of ``activation`` (None: the default dtype, f32 on CPU)."""
    if activation is None:
        activation = default_dtype()
    return BlockShape(
        tuple(
            Component(c.name, c.dtype, tuple(c.shape), slot_dtype(c.dtype, activation))
            for c in entry.components
        )
    )
