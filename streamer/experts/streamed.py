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
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import StreamerError
from ..models.experts import switch_glu
from ..packed import LayerEntry, PackedModel
from .cache import BlockShape, Component, ExpertCache
from .prefetch import Prefetcher
from .store import ExpertStore

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
        self._score_prediction(layer, experts)
        self._settle_prefetched(layer, keep=set(experts))
        slots: dict[int, int] = {}
        pending: list[tuple[int, int, Future]] = []
        pool = self.cache.pool(layer)
        try:
            for e in experts:
                if (layer, e) in self._prefetched:
                    slot, fut = self._prefetched.pop((layer, e))  # already pinned by prefetch()
                    pending.append((e, slot, fut))
                    self.stats.prefetch_used += 1
                    self.stats.misses += 1
                elif (slot := self.cache.lookup(layer, e)) is not None:
                    self.cache.pin(layer, [slot])
                    self.stats.hits += 1
                else:
                    slot = self.cache.allocate(layer, e)
                    pending.append((e, slot, self._read(layer, e, pool.buffers(slot))))
                    self.stats.misses += 1
                slots[e] = slot
        except BaseException:
            self._abandon(layer, slots, pending)
            raise
        return slots, pending

    def finish(self, layer: int, slots: dict[int, int], pending: list) -> None:
        """Waits for the reads ``begin`` started; on failure every slot of the step is released."""
        try:
            self._wait(layer, pending)
        except BaseException:
            self._abandon(layer, slots, pending)
            raise

    def _read(self, layer: int, expert: int, buffers: list) -> Future:
        if self.prefetch_mode != "off":
            return self.prefetcher.submit(layer, expert, buffers)
        # "off": read now, on this thread, one expert after another (the simple reference path).
        fut: Future = Future()
        start = time.perf_counter()
        try:
            fut.set_result(self.store.read_block(layer, expert, buffers))
            self.prefetcher.bytes_read += fut.result()
        except Exception as e:  # noqa: BLE001 - delivered through the future like a threaded read
            fut.set_exception(e)
        self.stats.stall_s += time.perf_counter() - start
        return fut

    def _wait(self, layer: int, pending: list[tuple[int, int, Future]]) -> None:
        start = time.perf_counter()
        for e, slot, fut in pending:
            try:
                fut.result(timeout=self.io_timeout_s)
            except FutureTimeout:
                raise StreamerError(
                    f"reading layer {layer} expert {e} took longer than {self.io_timeout_s:.0f} s; "
                    "is the disk still attached?"
                ) from None
            self.cache.commit(layer, e, slot)
        self.stats.stall_s += time.perf_counter() - start

    def _abandon(self, layer: int, slots: dict[int, int], pending: list[tuple[int, int, Future]]) -> None:
        """Undoes a failed acquire: failed or unfinished reads lose their slots, the rest are unpinned."""
        unfinished = {e for e, _, fut in pending if not (fut.done() and fut.exception() is None)}
        for e, slot in slots.items():
            if e in unfinished:
                if (layer, e) in self.cache:
                    self.cache.unpin(layer, [slot])
                self._drop(layer, e, slot)
            else:
                if (layer, e) not in self.cache:
                    self.cache.commit(layer, e, slot)
                self.cache.unpin(layer, [slot])

    def _drop(self, layer: int, expert: int, slot: int) -> None:
        fut = self.prefetcher.inflight(layer, expert)
        if fut is not None:  # let a late read finish before its slot can be reused
            try:
                fut.result(timeout=self.io_timeout_s)
            except Exception:  # noqa: BLE001 - the read is abandoned either way
                pass
        self.cache.abort(layer, slot)

    def release(self, layer: int, slots: dict[int, int]) -> None:
        self.cache.unpin(layer, slots.values())

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Starts reading ``experts`` of ``layer`` ahead of need, in free or evictable slots only."""
        pool = self.cache.pool(layer)
        for e in experts:
            key = (layer, e)
            if key in self._prefetched or key in self.cache:
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
                log.warning("prefetch of layer %d expert %d failed: %s", layer, key[1], e)
                self.cache.abort(layer, slot)
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
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


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
