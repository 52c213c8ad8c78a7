"""Model-state snapshots keyed by token-id prefixes, so a follow-up request prefills only its new part.

A hybrid model has two kinds of state. A KV cache could be cut back to any length; a DeltaNet state
cannot, so a prompt can only resume from a snapshot taken exactly at one of its prefixes. A snapshot
therefore holds every DeltaNet layer's state at its length, plus the KV cache as a chain of segments:
a snapshot taken later in the same conversation shares the earlier segments and adds only the
positions since, so keeping every turn of a long conversation costs its KV once, not once per turn.

``PrefixCache`` decides what stays (LRU within a byte budget and an entry count; shared segments
counted once) and does no MLX work; ``capture_state`` / ``restore_state`` move state in and out of a
model's layer caches.

Names: B = batch, Hkv = key/value heads, L = positions in a segment, D = head dim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from streamer.models.layer_cache import KVSnapshot, snapshot_arrays


@dataclass
class Snapshot:
    ids: tuple[int, ...]
    state: object  # what restore_state needs (a ModelState); opaque to the cache
    nbytes: int  # bytes this snapshot alone holds
    shared: tuple = ()  # parts it may share with other snapshots (each with .nbytes), counted once
    priority: int = 1  # lower goes first when over budget; a hit raises it to 1


class PrefixCache:
    """Snapshots keyed by the token ids that produced them, within ``max_bytes`` and ``max_entries``.

    Over budget, the least recently used snapshot of the lowest priority goes first: answer ends
    (priority 0) are often not reusable, because the chat template re-renders an answer differently
    (Qwen3.5 drops earlier turns' reasoning), while message boundaries (1) are what follow-ups resume.
    """

    def __init__(self, max_bytes: int, max_entries: int = 32):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._refs: dict[int, list] = {}  # id(part) -> [part, number of snapshots holding it]
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return tuple(ids) in self._entries

    def lookup(self, ids: Sequence[int]) -> Snapshot | None:
        """The longest snapshot whose ids are a strict prefix of ``ids`` (one token is left to run)."""
        for n in sorted({len(k) for k in self._entries}, reverse=True):
            if n < len(ids) and (snap := self._entries.get(tuple(ids[:n]))) is not None:
                self._entries.move_to_end(snap.ids)
                snap.priority = max(snap.priority, 1)
                self.hits += 1
                return snap
        self.misses += 1
        return None

    def store(self, ids: Sequence[int], state, nbytes: int, shared: tuple = (), priority: int = 1) -> bool:
        """Keeps a snapshot, evicting others while over budget; False if it cannot fit even alone."""
        key = tuple(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        if nbytes + sum(p.nbytes for p in shared) > self.max_bytes or self.max_entries < 1:
            return False
        self._entries[key] = Snapshot(key, state, nbytes, tuple(shared), priority)
        self.bytes += nbytes
        for part in shared:
            ref = self._refs.setdefault(id(part), [part, 0])
            ref[1] += 1
            self.bytes += part.nbytes if ref[1] == 1 else 0
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            self._evict_one(key)
        return True

    def _evict_one(self, keep: tuple[int, ...]) -> None:
        # The budget check in store() guarantees another snapshot exists; oldest first, lowest priority.
        old = min((s for k, s in self._entries.items() if k != keep), key=lambda s: s.priority)
        del self._entries[old.ids]
        self.bytes -= old.nbytes
        for part in old.shared:
            ref = self._refs[id(part)]
            ref[1] -= 1
            if ref[1] == 0:
                del self._refs[id(part)]
                self.bytes -= part.nbytes
        self.evictions += 1

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


@dataclass(eq=False)
class KVSegment:
    """Keys and values of positions [start, end) of every full-attention layer, in buffers of their own."""

    start: int
    end: int
    layers: tuple  # per layer: (keys, values) [B, Hkv, L, D], or None for a DeltaNet layer
    nbytes: int


@dataclass
class ModelState:
    length: int  # tokens the state has seen
    segments: tuple[KVSegment, ...]  # contiguous from position 0 to ``length``
    recurrent: tuple  # per layer: a DeltaNetSnapshot, or None for a full-attention layer
    # The layers other processes hold (a pipeline: ``distributed.pipeline.RemoteState``), kept there.
    remote: object = None


def capture_state(cache: list, base: ModelState | None) -> tuple[ModelState, int]:
    """Snapshots the layer caches as ``base``'s segments plus one for the positions since ``base``.

    Returns:
        (the state, the bytes it alone holds: its DeltaNet states; the segments are shared parts).
    """
    start = base.length if base else 0
    snaps = [layer_cache.snapshot() for layer_cache in cache]
    # Copies, not views: a view would pin the cache's whole buffer.
    kv = tuple(
        (mx.contiguous(s.keys[..., start:, :]), mx.contiguous(s.values[..., start:, :]))  # [B, Hkv, L, D]
        if isinstance(s, KVSnapshot)
        else None
        for s in snaps
    )
    recurrent = tuple(None if isinstance(s, KVSnapshot) else s for s in snaps)
    kv_arrays = [a for pair in kv if pair for a in pair]
    own_arrays = [a for s in recurrent if s is not None for a in snapshot_arrays(s)]
    mx.eval(kv_arrays, own_arrays)
    length = snaps[0].offset
    segments = base.segments if base else ()
    if length > start and kv_arrays:
        segments += (KVSegment(start, length, kv, sum(a.nbytes for a in kv_arrays)),)
    # Other ranks' layers are snapshotted whole there (no segments shared across turns): their bytes
    # count as this snapshot's own.
    remote = cache.snapshot_remote() if hasattr(cache, "snapshot_remote") else None
    own = sum(a.nbytes for a in own_arrays) + (remote.nbytes if remote is not None else 0)
    return ModelState(length, segments, recurrent, remote), own


def restore_state(cache: list, state: ModelState) -> None:
    """Puts ``state`` into fresh layer caches (their own buffers; the snapshot stays as it was)."""
    for i, layer_cache in enumerate(cache):
        if state.recurrent[i] is not None:
            layer_cache.restore(state.recurrent[i])
            continue
        keys = [seg.layers[i][0] for seg in state.segments]
        values = [seg.layers[i][1] for seg in state.segments]
        if len(keys) > 1:
            keys, values = [mx.concatenate(keys, axis=2)], [mx.concatenate(values, axis=2)]
        layer_cache.restore(KVSnapshot(keys[0], values[0], state.length))
    if state.remote is not None:
        cache.restore_remote(state.remote)
