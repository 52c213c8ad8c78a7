"""Streamed experts: the object the MoE block calls when experts live on the SSD.

``ExpertRuntime`` joins the pieces for one packed model — ExpertStore (bytes), ExpertCache (what stays),
Prefetcher (when to read) — and ``StreamedExperts`` is one layer's ``experts(x, indices)``:

1. the router's top-k ids come to the host (this evaluates the graph up to the router);
2. hits are pinned in their slots, misses get slots and are read in parallel;
3. the chosen experts run with ``mx.gather_qmm`` over the slot pools, exactly as the resident
   experts run over their stacked tensors (same kernels, same order, slot ids for expert ids);
4. the result is evaluated before the slots are unpinned, so no slot is refilled under a live graph.

When one step routes to more distinct experts than the pool has slots (long prefill chunks on a
small cache), the experts are processed in batches that fit; memory stays within the budget.

Names: M = token-expert pairs, U = distinct experts in a step, K = experts per token, H = hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..models.experts import gather_qmm_experts, switch_glu
from ..packed import LayerEntry, PackedModel
from .cache import BlockShape, Component, ExpertCache
from .prefetch import Prefetcher
from .store import ExpertReadTimeout, ExpertStore

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

    def reset(self) -> None:
        self.__init__()


class ExpertRuntime:
    """Store + cache + prefetcher for one packed model; the graph-building thread calls it.

    Args:
        packed: the opened packed model.
        cache_bytes: byte budget of the expert slots.
        min_slots: the fewest slots a pool may have (the model's top-k).
        io_mode: "buffered" or "direct".
        threads: reader threads.
        io_timeout_s: longest wait for one expert read before the step fails.
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
    ):
        self.packed = packed
        self.prefetch_mode = prefetch
        self.min_slots = min_slots
        layers = packed.manifest.layers
        shapes = {e.layer: block_shape_of(e) for e in layers}
        self.cache = ExpertCache(shapes, {e.layer: e.num_experts for e in layers}, cache_bytes, min_slots)
        self.store = ExpertStore(packed, io_mode, fault=fault)
        self.prefetcher = Prefetcher(self.store.read_block, threads)
        self.io_timeout_s = io_timeout_s
        self.stats = StreamStats()
        self._prefetched: dict[tuple[int, int], tuple[int, Future]] = {}
        self._predicted: dict[int, set[int]] = {}  # layer -> experts guessed for it
        self._orphans: list[tuple[int, int, int, Future]] = []  # (layer, expert, slot, read) abandoned
        # Called as on_route(layer, ids [tokens, K]) for every routing decision (for --trace).
        self.on_route = None

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
        self._score_prediction(layer, experts)
        self._settle_prefetched(layer, keep=set(experts))
        slots: dict[int, int] = {}
        pending: list[tuple[int, int, Future]] = []
        pool = self.cache.pool(layer)
        try:
            # Hits first: pinned before any miss allocates, so a miss never evicts an expert this step uses.
            misses = []
            for e in experts:
                if (layer, e) in self._prefetched:
                    slot, fut = self._prefetched.pop((layer, e))  # already pinned by prefetch()
                    pending.append((e, slot, fut))
                    self.stats.prefetch_used += 1
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
        fut = self.prefetcher.submit(layer, expert, buffers)
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
        still running after that keeps its slot until it ends (``_free_when_done``).
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
                self._free_when_done(layer, e, slot, fut)

    def _free_when_done(self, layer: int, expert: int, slot: int, fut: Future | None) -> None:
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
        # A new read of an expert whose abandoned read still runs would be merged with it (Prefetcher).
        if any(o[0] == layer and o[1] == expert for o in self._orphans):
            raise ExpertReadTimeout(
                f"{self.packed.path / self.layer_entry(layer).file}: an earlier read of layer {layer} "
                f"expert {expert} has not returned after {self.io_timeout_s:g} s (--io-timeout); "
                "is the disk still attached?"
            )

    def release(self, layer: int, slots: dict[int, int]) -> None:
        self.cache.unpin(layer, slots.values())

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Starts reading ``experts`` of ``layer`` ahead of need, in free or evictable slots only."""
        pool = self.cache.pool(layer)
        for e in experts:
            key = (layer, e)
            if key in self._prefetched or key in self.cache or any(o[:2] == key for o in self._orphans):
                continue
            free_slots = pool.slots - self.cache.pinned_count_in(layer)
            if free_slots <= self.cache_min_free(layer):
                return
            slot = self.cache.allocate(layer, e)
            self._prefetched[key] = (slot, self.prefetcher.submit(layer, e, pool.buffers(slot)))
            self.stats.prefetch_issued += 1

    def predict(self, layer: int, experts: Sequence[int]) -> None:
        """Records a guess of ``layer``'s experts (scored when it routes) and prefetches it."""
        self._predicted[layer] = set(experts)
        self.prefetch(layer, experts)

    def _score_prediction(self, layer: int, experts: Sequence[int]) -> None:
        guess = self._predicted.pop(layer, None)
        if guess is not None:
            self.stats.predicted += len(guess)
            self.stats.predicted_right += len(guess & set(experts))

    def cache_min_free(self, layer: int) -> int:
        # Keep room for the layer's own top-k: prefetch must never starve the step it runs ahead of.
        return self.min_slots

    def _settle_prefetched(self, layer: int, keep: set[int]) -> None:
        """Commits this layer's finished prefetches that the step does not need and unpins them."""
        for key in [k for k in self._prefetched if k[0] == layer and k[1] not in keep]:
            slot, fut = self._prefetched.pop(key)
            try:
                fut.result(timeout=self.io_timeout_s)
            except Exception as e:  # noqa: BLE001 - a failed guess costs nothing but its slot
                log.warning("prefetch of layer %d expert %d failed: %s", layer, key[1], e or "timed out")
                self._free_when_done(layer, key[1], slot, fut)
                continue
            self.cache.commit(layer, key[1], slot)
            self.cache.unpin(layer, [slot])

    def preload(self) -> int:
        """Reads experts into the cache, layer by layer, until it is full; returns experts loaded."""
        loaded = 0
        for entry in self.packed.manifest.layers:
            room = self.cache.pool(entry.layer).slots - self.cache.used_slots(entry.layer)
            todo = [e for e in range(entry.num_experts) if (entry.layer, e) not in self.cache][:room]
            for start in range(0, len(todo), self.min_slots):
                slots = self.acquire(entry.layer, todo[start : start + self.min_slots])
                self.release(entry.layer, slots)
                loaded += len(slots)
        self.stats.reset()  # preloading is set-up, not traffic of the run
        return loaded

    def close(self) -> None:
        self._reclaim()
        if self._orphans:  # a stuck read: do not wait for it, and leave its file open under it
            log.warning("%d expert read(s) never returned; closing without them", len(self._orphans))
            self.prefetcher.close(wait=False)
            return
        self.prefetcher.close()
        self.store.close()

    def snapshot_stats(self) -> dict:
        return {
            "cache_hits": self.stats.hits,
            "cache_misses": self.stats.misses,
            "bytes_read": self.prefetcher.bytes_read,
            "stall_s": self.stats.stall_s,
            "prefetch_issued": self.stats.prefetch_issued,
            "prefetch_used": self.stats.prefetch_used,
            "predicted": self.stats.predicted,
            "predicted_right": self.stats.predicted_right,
            "cache_bytes": self.cache.capacity_bytes,
        }


def block_shape_of(entry: LayerEntry) -> BlockShape:
    return BlockShape(tuple(Component(c.name, c.dtype, tuple(c.shape)) for c in entry.components))


class _PoolProjection:
    """One projection (gate/up/down) of a layer's experts, computed over slot pool arrays."""

    def __init__(self, arrays: dict, entry: LayerEntry, name: str):
        self.weight = arrays[f"{name}.weight"]
        self.scales = arrays.get(f"{name}.scales")
        self.biases = arrays.get(f"{name}.biases")
        c = entry.component(f"{name}.weight")
        self.bits, self.group_size, self.mode = c.bits, c.group_size, c.mode or "affine"

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self.bits is None:
            return mx.gather_mm(
                x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
            )
        return gather_qmm_experts(
            x, self.weight, self.scales, self.biases, indices, self.bits, self.group_size, self.mode,
            sorted_indices,
        )  # fmt: skip


class StreamedExperts:
    """One layer's routed experts, read on demand through an ExpertRuntime.

    Args:
        runtime: the shared ExpertRuntime.
        layer: this layer's index.
        predictor: optional ``x -> logits of the next layer's router``; in predict mode its top-k
            is prefetched for the next layer while this one computes.
    """

    def __init__(self, runtime: ExpertRuntime, layer: int, predictor=None, top_k: int = 0):
        self.runtime = runtime
        self.layer = layer
        self.predictor = predictor
        self.top_k = top_k
        entry = runtime.layer_entry(layer)
        arrays = runtime.cache.pool(layer).arrays
        self._proj = [_PoolProjection(arrays, entry, n) for n in ("gate_proj", "up_proj", "down_proj")]
        self._capacity = runtime.cache.pool(layer).slots

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        guess = self._guess_next(x)
        if guess is not None:
            mx.eval(indices, guess)  # one sync for both
        ids = np.array(indices)  # [..., K]: evaluates the router; top-k itself stayed on the device
        if self.runtime.on_route is not None:
            self.runtime.on_route(self.layer, ids.reshape(-1, ids.shape[-1]))
        unique = np.unique(ids)
        if len(unique) > self._capacity:
            return self._run_in_batches(x, ids, unique)
        slots, pending = self.runtime.begin(self.layer, unique.tolist())
        try:
            if guess is not None:  # reads for the next layer start now and overlap this layer's compute
                self.runtime.predict(self.layer + 1, np.unique(np.array(guess)).tolist())
            y = self._compute(x, ids, slots, pending)
        finally:
            self.runtime.release(self.layer, slots)
        return y

    def _guess_next(self, x: mx.array) -> mx.array | None:
        if self.predictor is None or self.runtime.prefetch_mode != "predict" or x.size != x.shape[-1]:
            return None  # decode only: a prefill chunk is handled expert-major anyway
        logits = self.predictor(x)
        return mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k :]

    def _compute(self, x: mx.array, ids: np.ndarray, slots: dict[int, int], pending: list) -> mx.array:
        """Runs the step; with both hits and misses, the hits compute while the misses are read."""
        missing = np.array([e for e, _, _ in pending], dtype=ids.dtype)
        if len(missing) == 0 or len(missing) == len(slots) or self.runtime.prefetch_mode == "off":
            self.runtime.finish(self.layer, slots, pending)
            return self._evaluated(x, ids, slots)
        flat = ids.reshape(-1)
        is_miss = np.isin(flat, missing)
        hit_pairs, miss_pairs = np.flatnonzero(~is_miss), np.flatnonzero(is_miss)
        y_hits = self._pairs(x, ids, hit_pairs, slots)  # evaluated: overlaps the reads in flight
        self.runtime.finish(self.layer, slots, pending)
        y_misses = self._pairs(x, ids, miss_pairs, slots)
        return _reassemble([y_hits, y_misses], [hit_pairs, miss_pairs], ids.shape)

    def _evaluated(self, x: mx.array, ids: np.ndarray, slots: dict[int, int]) -> mx.array:
        y = switch_glu(x, mx.array(_slot_ids(ids, slots)), *self._proj)
        mx.eval(y)  # before unpinning: the slots must not change under an unevaluated graph
        return y

    def _pairs(self, x: mx.array, ids: np.ndarray, pairs: np.ndarray, slots: dict[int, int]) -> mx.array:
        """Outputs [P, H] of the token-expert pairs ``pairs`` (positions in the flattened [M] pairs)."""
        K, H = ids.shape[-1], x.shape[-1]
        x_pairs = x.reshape(-1, H)[mx.array(pairs // K)]  # [P, H]
        return self._evaluated(x_pairs, ids.reshape(-1)[pairs].reshape(-1, 1), slots).reshape(-1, H)

    def _run_in_batches(self, x: mx.array, ids: np.ndarray, unique: np.ndarray) -> mx.array:
        """More distinct experts than slots: run the token-expert pairs of a few experts at a time."""
        flat = ids.reshape(-1)  # [M]
        batch = max(1, self._capacity - self.runtime.cache.pinned_count_in(self.layer))
        pieces, order = [], []
        for start in range(0, len(unique), batch):
            chosen = unique[start : start + batch]
            pairs = np.flatnonzero(np.isin(flat, chosen))
            slots = self.runtime.acquire(self.layer, chosen.tolist())
            try:
                pieces.append(self._pairs(x, ids, pairs, slots))
            finally:
                self.runtime.release(self.layer, slots)
            order.append(pairs)
        return _reassemble(pieces, order, ids.shape)


def _slot_ids(ids: np.ndarray, slots: dict[int, int]) -> np.ndarray:
    experts = np.fromiter(slots, dtype=np.int64)
    slot_of = np.zeros(int(experts.max()) + 1, dtype=np.uint32)
    slot_of[experts] = list(slots.values())
    return slot_of[ids]


def _reassemble(pieces: list[mx.array], order: list[np.ndarray], shape: tuple[int, ...]) -> mx.array:
    """Per-pair outputs computed in groups back to [..., K, H] in the original pair order."""
    inverse = mx.array(np.argsort(np.concatenate(order)))
    y = mx.concatenate(pieces)[inverse]
    return y.reshape(*shape, y.shape[-1])
