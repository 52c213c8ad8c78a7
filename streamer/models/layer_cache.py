"""Per-layer inference state: a KV cache for full attention, conv + recurrent state for Gated DeltaNet.

Both can be snapshotted and restored (e.g. to reuse a prompt prefix). A DeltaNet state cannot be
truncated like a KV cache: only a snapshot taken at the right position brings it back.

Names: B = batch, Hkv = key/value heads, L = cached tokens, D = head dim, Kc = conv kernel size,
Hv = value heads, Dv / Dk = value / key head dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class KVSnapshot:
    keys: mx.array | None  # [B, Hkv, L, D]
    values: mx.array | None
    offset: int


class KVCache:
    """Keys and values of the tokens seen so far, in a buffer grown ``step`` tokens at a time."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None  # [B, Hkv, capacity, D]
        self.values: mx.array | None = None
        self.offset = 0  # tokens cached = position of the next token

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Appends keys / values [B, Hkv, L_new, D] and returns all cached ones [B, Hkv, L, D]."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        # In-place slice assignment rebinds these array objects: snapshots hold their own slices.
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        capacity = -(-needed // self.step) * self.step
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> list[mx.array]:
        """The arrays this cache holds (to evaluate them together with a step's output)."""
        return [a for a in (self.keys, self.values) if a is not None]

    def snapshot(self) -> KVSnapshot:
        if self.keys is None:
            return KVSnapshot(None, None, 0)
        return KVSnapshot(self.keys[..., : self.offset, :], self.values[..., : self.offset, :], self.offset)

    def restore(self, snap: KVSnapshot) -> None:
        self.keys = self.values = None
        self.offset = 0
        if snap.keys is not None:
            self._grow(snap.keys, snap.values, snap.offset)
            self.keys[..., : snap.offset, :] = snap.keys
            self.values[..., : snap.offset, :] = snap.values
            self.offset = snap.offset


@dataclass(frozen=True)
class DeltaNetSnapshot:
    conv_state: mx.array | None  # [B, Kc - 1, conv channels]
    recurrent_state: mx.array | None  # [B, Hv, Dv, Dk]
    offset: int


class DeltaNetCache:
    """The last Kc - 1 conv inputs and the recurrent state of one Gated DeltaNet layer."""

    def __init__(self):
        self.conv_state: mx.array | None = None
        self.recurrent_state: mx.array | None = None
        self.offset = 0  # tokens seen

    @property
    def state(self) -> list[mx.array]:
        """The arrays this cache holds (to evaluate them together with a step's output)."""
        return [a for a in (self.conv_state, self.recurrent_state) if a is not None]

    def snapshot(self) -> DeltaNetSnapshot:
        # The layer replaces (never mutates) these arrays, so references are a snapshot.
        return DeltaNetSnapshot(self.conv_state, self.recurrent_state, self.offset)

    def restore(self, snap: DeltaNetSnapshot) -> None:
        self.conv_state, self.recurrent_state = snap.conv_state, snap.recurrent_state
        self.offset = snap.offset


LayerCache = KVCache | DeltaNetCache


def snapshot_caches(caches: list[LayerCache]) -> list:
    """A snapshot of every layer's state, to hand back to ``restore_caches``."""
    return [c.snapshot() for c in caches]


def restore_caches(caches: list[LayerCache], snapshots: list) -> None:
    for c, s in zip(caches, snapshots, strict=True):
        c.restore(s)
