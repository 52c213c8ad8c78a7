"""Streamed experts: the object the MoE block calls when experts live on the SSD.

``ExpertRuntime`` joins the pieces for one packed model — ExpertStore (bytes), ExpertCache (what stays),
ReaderPool (when to read) — and ``StreamedExperts`` is one layer's ``experts(x, indices)``:

1. the router's top-k ids come to the host (this evaluates the graph up to the router);
2. hits are pinned in their slots, misses get slots and are read in parallel;
3. the chosen experts run with ``mx.gather_qmm`` over the slot pools, exactly as the resident
   experts run over their stacked tensors (same kernels, same order, slot ids for expert ids);
4. the result is evaluated before the slots are unpinned, so no slot is refilled under a live graph.

When one step routes to more distinct experts than the pool has slots (long prefill chunks on a
small cache), the experts are processed in batches that fit; memory stays within the budget.

**All cached.** Once every expert of the model is in a slot (a cache as big as the model, preloaded or
warmed up), nothing can miss and no slot is ever refilled, so steps 1, 2 and 4 are skipped: slot ids are
looked up on the device (``slot_of[indices]``, a per-layer int32 table) and the layer's output stays an
unevaluated graph, like the resident model's. The whole token is then evaluated once, where its logits are
sampled, instead of one host round trip per layer. Hits are still counted (device scalars, summed when the
stats are read). ``on_route`` (--trace) needs the ids on the host, so a traced run keeps the host path.

Names: M = token-expert pairs, U = distinct experts in a step, K = experts per token, H = hidden.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np

from streamer.experts.runtime import ExpertRuntime
from streamer.models.resident_experts import gather_qmm_experts, switch_glu
from streamer.storage.packed_format import LayerEntry

log = logging.getLogger(__name__)


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
        pool = runtime.cache.pool(layer)
        self._proj = [_PoolProjection(pool.arrays, entry, n) for n in ("gate_proj", "up_proj", "down_proj")]
        self._capacity = pool.slots

    @property
    def lazy(self) -> bool:
        """Whether a call adds to the graph without a host sync (every expert cached, no routing hook)."""
        return self.runtime.on_route is None and self.runtime.all_cached()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if self.lazy:
            return self._all_cached(x, indices)
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

    def _all_cached(self, x: mx.array, indices: mx.array) -> mx.array:
        """Every expert is in a fixed slot: a lazy graph, no host round trip, no pins."""
        slot_ids = self.runtime.slot_table(self.layer)[indices]
        if x.size == x.shape[-1]:  # one token: its top-k are distinct
            self.runtime.count_hits(indices.shape[-1])
        else:
            seen = mx.zeros(self.runtime.layer_entry(self.layer).num_experts, dtype=mx.int32)
            self.runtime.count_hits((seen.at[indices.reshape(-1)].add(1) > 0).sum())
        return switch_glu(x, slot_ids, *self._proj)

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
