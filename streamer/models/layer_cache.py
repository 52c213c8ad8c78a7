"""Per-layer inference state: a KV cache for full attention, conv + recurrent state for Gated DeltaNet.

Both can be snapshotted and restored (e.g. to reuse a prompt prefix). A DeltaNet state cannot be
truncated like a KV cache: only a snapshot taken at the right position brings it back.

Names: B = batch, Hkv = key/value heads, L = cached tokens, D = head dim, Kc = conv kernel size,
Hv = value heads, Dv / Dk = value / key head dims.
"""

from __future__ import annotations

import dataclasses
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

    def update(self, conv_state: mx.array, recurrent_state: mx.array, tokens: int) -> None:
        """Takes the layer's new state after it has seen ``tokens`` more tokens."""
        self.conv_state, self.recurrent_state = conv_state, recurrent_state
        self.offset += tokens

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


LayerCache = KVCache | DeltaNetCache


class KVBatch:
    """The KV caches of one attention layer for several sequences decoded together (row i = member i).

    Members keep their own buffers and lengths: attention runs row by row over each member's cache,
    exactly as for a sequence alone, while every other operation of the layer runs on the whole batch.
    """

    def __init__(self, members: list[KVCache]):
        self.members = members


class DeltaNetBatch:
    """The DeltaNet caches of one layer for several sequences decoded together (row i = member i).

    The layer reads the members' states stacked along the batch axis and hands back the new stacked
    state, which is split into the members again: each member stays an ordinary ``DeltaNetCache``
    that can be snapshotted, restored or decoded alone between batched steps.
    """

    def __init__(self, members: list[DeltaNetCache]):
        self.members = members

    @property
    def conv_state(self) -> mx.array | None:
        return _stacked([m.conv_state for m in self.members])

    @property
    def recurrent_state(self) -> mx.array | None:
        return _stacked([m.recurrent_state for m in self.members])

    def update(self, conv_state: mx.array, recurrent_state: mx.array, tokens: int) -> None:
        for i, member in enumerate(self.members):
            # Copies, not views: a view would keep the whole batch's state alive for each member.
            member.update(
                mx.contiguous(conv_state[i : i + 1]), mx.contiguous(recurrent_state[i : i + 1]), tokens
            )


class RaggedBatch:
    """One layer's caches of several sequences whose new tokens lie end to end along one row ([1, T]).

    Member i owns the next ``lengths[i]`` positions. A mixer (attention, DeltaNet) runs on each member's
    span alone, with that member's cache, exactly as the sequence alone would; every token-wise operation
    (norms, projections, the MoE block) runs on all T positions at once. This is how several prompts are
    prefilled in one model call.
    """

    def __init__(self, members: list[LayerCache], lengths: list[int]):
        if len(members) != len(lengths) or min(lengths, default=0) < 1:
            raise ValueError("a ragged batch needs one length >= 1 per member")
        self.members, self.lengths = members, lengths

    @property
    def last_positions(self) -> mx.array:
        """The position of each member's last token in the row."""
        ends, total = [], 0
        for n in self.lengths:
            total += n
            ends.append(total - 1)
        return mx.array(ends)

    def map(self, mixer, x: mx.array) -> mx.array:
        """``mixer(span, member_cache)`` on each member's span of ``x`` [1, T, ...], joined back along T."""
        cuts, total = [], 0
        for n in self.lengths[:-1]:
            total += n
            cuts.append(total)
        spans = mx.split(x, cuts, axis=1)
        return mx.concatenate([mixer(span, m) for span, m in zip(spans, self.members, strict=True)], axis=1)


class CacheBatch(list):
    """Per-layer batches (``KVBatch`` / ``DeltaNetBatch`` / ``RaggedBatch``) that remember the sequences'
    own cache lists they were made from: a model whose state is not all in this process (a pipeline
    across ranks) names the sequences to the others by them."""

    def __init__(self, layers: list, sequences: list[list[LayerCache]], lengths: list[int] | None = None):
        super().__init__(layers)
        self.sequences = sequences
        self.lengths = lengths  # the ragged spans, or None for one new token per sequence


def ragged_caches(caches: list[list[LayerCache]], lengths: list[int]) -> CacheBatch:
    """Per-sequence layer caches -> per-layer ragged batches, for one call over their prompts end to end."""
    layers = [RaggedBatch(list(members), lengths) for members in zip(*caches, strict=True)]
    return CacheBatch(layers, list(caches), list(lengths))


def _stacked(states: list[mx.array | None]) -> mx.array | None:
    if all(s is None for s in states):
        return None
    if any(s is None for s in states):
        raise ValueError("a batched DeltaNet step needs every member to have a state (prefill each first)")
    return mx.concatenate(states, axis=0)


def batch_caches(caches: list[list[LayerCache]]) -> CacheBatch:
    """Per-sequence layer caches -> per-layer batches, for one model call over all the sequences."""
    layers = []
    for members in zip(*caches, strict=True):
        layers.append(
            KVBatch(list(members)) if isinstance(members[0], KVCache) else DeltaNetBatch(list(members))
        )
    return CacheBatch(layers, list(caches))


def snapshot_caches(caches: list[LayerCache]) -> list:
    """A snapshot of every layer's state, to hand back to ``restore_caches``.

    A cache list holding state in other processes too (``distributed.pipeline.StageCache``) has its own
    ``snapshot`` / ``restore``, which take those parts along."""
    if hasattr(caches, "snapshot"):
        return caches.snapshot()
    return [c.snapshot() for c in caches]


def snapshot_arrays(snap: KVSnapshot | DeltaNetSnapshot) -> list[mx.array]:
    """The arrays a layer's snapshot holds (a KV cache's or a DeltaNet layer's, whichever it has)."""
    values = (getattr(snap, f.name) for f in dataclasses.fields(snap))
    return [a for a in values if isinstance(a, mx.array)]


def restore_caches(caches: list[LayerCache], snapshots: list) -> None:
    if hasattr(caches, "restore"):
        caches.restore(snapshots)
        return
    for c, s in zip(caches, snapshots, strict=True):
        c.restore(s)
