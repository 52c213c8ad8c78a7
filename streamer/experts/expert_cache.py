"""ExpertCache: which experts stay in memory. Slot pools, an LRU map, a byte budget, pinning; no I/O.

A *slot pool* holds one MLX array per block component (e.g. ``gate_proj.weight``), shaped
``[slots, ...component shape]``, for every layer whose expert blocks have the same component shapes
(mixed-precision checkpoints get one pool per distinct block shape). An expert lives in one slot;
``mx.gather_qmm`` reads the pools with slot ids as ``rhs_indices``.

Slots are filled by writing into the arrays' memory through zero-copy numpy views
(``np.array(mx_array, copy=False)`` is writable and shares the buffer). That is safe only while no
unevaluated graph reads the slot: callers pin the slots a step uses and unpin them after evaluating
it; eviction never picks a pinned slot.

The cache is owned by the one thread that builds MLX graphs; I/O workers only fill buffers it hands out.

**Slot dtypes.** A float component (scales, biases, unquantized weights) is held in
``mx.result_type(activation dtype, stored dtype)``, not as stored: ``mx.gather_qmm`` / ``mx.gather_mm``
convert scales (or weights) whose dtype differs from that promoted dtype for the *whole* array they are
given, on every call, so a pool of published blocks (bf16 scales, f32 activations on CPU) got slower the
bigger the cache: one 1024x512 4-bit projection, 8 routed, took 2.6 ms over 8 slots and 31 ms over 1,024
(group size 32: 60 ms); f32 scales cost the same at every pool size. The widening (bf16 or f16 -> f32; the
promoted dtype is never narrower than the stored one) is done once per read, on the reader thread, with
numpy — exact, so results are bit-identical to the kernels' own conversion (and to mlx-lm). A slot then
takes more memory than its block on disk (4-bit, group 64: +11 %); ``BlockShape.nbytes`` is the slot's
in-memory size, so budgets in bytes buy honestly fewer slots.

Names: S = slots in a pool, E = experts in a layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from streamer.errors import ConfigError
from streamer.experts.policy import DEFAULT_POLICY
from streamer.experts.slot_book import SlotBook
from streamer.storage.safetensors_file import tensor_nbytes

# Storage dtype per safetensors dtype: slots are written as raw integers of the same width and read
# through ``.view`` as the real dtype (numpy cannot address bfloat16 memory directly).
_STORAGE = {
    "U32": (mx.uint32, mx.uint32),
    "U8": (mx.uint8, mx.uint8),
    "F32": (mx.uint32, mx.float32),
    "BF16": (mx.uint16, mx.bfloat16),
    "F16": (mx.uint16, mx.float16),
}
_SAFETENSORS = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16"}
_FLOATS = ("F32", "BF16", "F16")


def slot_dtype(stored: str, activation: mx.Dtype | None) -> str:
    """The dtype a component is held in: ``mx.result_type(activation, stored)`` for floats, else as stored."""
    if activation is None or stored not in _FLOATS:
        return stored
    return _SAFETENSORS[mx.result_type(activation, _STORAGE[stored][1])]


@dataclass(frozen=True)
class Component:
    """One tensor of an expert block, e.g. ``("gate_proj.weight", "U32", (512, 512))``.

    ``dtype`` is the stored (on-disk) dtype; ``held`` the dtype of the slot (None: as stored).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    held: str | None = None

    @property
    def slot_dtype(self) -> str:
        return self.held or self.dtype

    @property
    def nbytes(self) -> int:
        """Bytes in a slot (memory)."""
        return tensor_nbytes(self.slot_dtype, self.shape)

    @property
    def stored_nbytes(self) -> int:
        """Bytes in the block on disk."""
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class BlockShape:
    """The components of one expert, in block order. Layers with equal BlockShapes share a pool."""

    components: tuple[Component, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of one slot in memory (more than the block on disk when components are widened)."""
        return sum(c.nbytes for c in self.components)


class SlotBuffers(list):
    """The writable byte buffers of one slot's components, in block order (a list, for ``os.preadv``).

    ``read(fill)`` is how readers fill the slot: ``fill(buffers) -> bytes`` gets the slot's own memory
    for components held as stored, and a staging buffer for widened ones, which are then converted
    into the slot. Runs on reader threads: numpy only, no MLX.
    """

    def __init__(self, pool: SlotPool, slot: int):
        super().__init__(memoryview(pool._views[c.name][slot]).cast("B") for c in pool.shape.components)
        self._pool, self._slot = pool, slot

    def read(self, fill) -> int:
        comps = self._pool.shape.components
        staged = {
            i: np.empty(c.stored_nbytes, dtype=np.uint8)
            for i, c in enumerate(comps)
            if c.held not in (None, c.dtype)
        }
        n = fill([memoryview(staged[i]) if i in staged else b for i, b in enumerate(self)])
        for i, raw in staged.items():
            c = comps[i]
            _widen(raw, c.dtype, self._pool._views[c.name][self._slot].reshape(-1), c.slot_dtype)
        return n


def _widen(raw: np.ndarray, stored: str, dst: np.ndarray, held: str) -> None:
    """Exact float widening of ``raw`` bytes into ``dst`` (a uint32 view of float32 memory)."""
    if held != "F32":
        raise ValueError(f"cannot hold {stored} as {held}")  # result_type never gives anything else
    if stored == "BF16":  # bfloat16 is the top half of a float32: shifting is the exact conversion
        np.left_shift(raw.view(np.uint16), 16, out=dst, dtype=np.uint32)
    elif stored == "F16":
        dst.view(np.float32)[:] = raw.view(np.float16)
    else:
        raise ValueError(f"cannot widen {stored} to {held}")


class SlotPool:
    """``slots`` expert-sized places for one BlockShape, as MLX arrays with writable numpy views."""

    def __init__(self, shape: BlockShape, slots: int):
        self.shape = shape
        self.slots = slots
        self._storage = {}
        self._views = {}
        for c in shape.components:
            storage_dtype, _ = _STORAGE[c.slot_dtype]
            arr = mx.zeros((slots, *c.shape), dtype=storage_dtype)
            mx.eval(arr)
            self._storage[c.name] = arr
            self._views[c.name] = np.array(arr, copy=False)  # zero-copy, writable
        self.arrays = {
            c.name: self._storage[c.name].view(_STORAGE[c.slot_dtype][1]) for c in shape.components
        }

    def buffers(self, slot: int) -> SlotBuffers:
        """``slot``'s component buffers (slot memory) in block order; ``.read(fill)`` fills them."""
        return SlotBuffers(self, slot)


class ExpertCache:
    """Maps (layer, expert) to slots within a byte budget. Single-threaded by design (see module doc).

    Args:
        layer_shapes: the BlockShape of every layer's experts.
        layer_experts: number of experts per layer (REAP-pruned models differ per layer).
        budget_bytes: bytes of expert slots in all pools together.
        min_slots: the fewest slots any pool gets (at least one layer's top-k).
        policy: the eviction policy of every pool (``experts/policy.py``: "lru" or "lfu").
    """

    def __init__(
        self,
        layer_shapes: Mapping[int, BlockShape],
        layer_experts: Mapping[int, int],
        budget_bytes: int,
        min_slots: int,
        policy: str = DEFAULT_POLICY,
    ):
        self._pool_of_layer = dict(layer_shapes)
        self.policy = policy
        self.slots_per_shape = plan_slots(layer_shapes, layer_experts, budget_bytes, min_slots)
        self._pools = {shape: SlotPool(shape, n) for shape, n in self.slots_per_shape.items()}
        self._books = {shape: SlotBook(n, policy) for shape, n in self.slots_per_shape.items()}
        self._experts_per_shape: Counter = Counter()
        for layer, shape in layer_shapes.items():
            self._experts_per_shape[shape] += layer_experts[layer]
        self.evictions = 0  # committed experts dropped to make room
        self.generation = 0  # changes whenever an expert enters or leaves a slot

    def _book(self, layer: int) -> SlotBook:
        return self._books[self._pool_of_layer[layer]]

    @property
    def all_resident(self) -> bool:
        """Every expert of every layer is committed to a slot. Then nothing can miss, so nothing is ever
        evicted or refilled again: slots are fixed and a graph may read them unpinned and unevaluated."""
        return all(len(book) == self._experts_per_shape[shape] for shape, book in self._books.items())

    def slot_table(self, layer: int, num_experts: int) -> np.ndarray:
        """expert -> slot of ``layer`` (int32, -1 where not cached), without counting uses."""
        table = np.full(num_experts, -1, dtype=np.int32)
        for (l, e), slot in self._book(layer).items():
            if l == layer:
                table[e] = slot
        return table

    @property
    def capacity_bytes(self) -> int:
        return sum(s.nbytes * n for s, n in self.slots_per_shape.items())

    def pool(self, layer: int) -> SlotPool:
        return self._pools[self._pool_of_layer[layer]]

    def lookup(self, layer: int, expert: int) -> int | None:
        """The slot holding (layer, expert), counting a use for the policy; None on a miss."""
        return self._book(layer).lookup((layer, expert))

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._book(key[0])

    def allocate(self, layer: int, expert: int) -> int:
        """A pinned slot for (layer, expert) to be filled; ``commit`` or ``abort`` it afterwards.

        Takes a free slot or evicts the policy's victim among the unpinned ones.

        Raises:
            CacheFullError (slot_book): every slot of the layer's pool is pinned.
        """
        slot, evicted = self._book(layer).allocate()
        if evicted:
            self.evictions += 1
            self.generation += 1
        return slot

    def commit(self, layer: int, expert: int, slot: int) -> None:
        """Records that ``slot`` now holds (layer, expert). The slot stays pinned until ``unpin``."""
        self._book(layer).commit((layer, expert), slot)
        self.generation += 1

    def abort(self, layer: int, slot: int) -> None:
        """Returns a slot whose fill failed to the free list."""
        self._book(layer).abort(slot)
        self.generation += 1

    def pin(self, layer: int, slots: Iterable[int]) -> None:
        book = self._book(layer)
        for s in slots:
            book.pin(s)

    def unpin(self, layer: int, slots: Iterable[int]) -> None:
        book = self._book(layer)
        for s in slots:
            book.unpin(s)

    def pinned_count(self) -> int:
        return sum(book.pinned for book in self._books.values())

    def pinned_count_in(self, layer: int) -> int:
        """Pinned slots in the pool that serves ``layer``."""
        return self._book(layer).pinned

    def used_slots(self, layer: int) -> int:
        """Slots holding committed experts in the pool that serves ``layer`` (all layers sharing it)."""
        return len(self._book(layer))

    def resident_experts(self, layer: int) -> list[int]:
        return sorted(e for (l, e), _ in self._book(layer).items() if l == layer)


def plan_slots(
    layer_shapes: Mapping[int, BlockShape],
    layer_experts: Mapping[int, int],
    budget_bytes: int,
    min_slots: int,
) -> dict[BlockShape, int]:
    """Slots per pool: the budget split in proportion to each pool's expert bytes, capped at its experts.

    Raises:
        ConfigError: the budget cannot give every pool ``min_slots`` slots.
    """
    experts_per_shape: Counter = Counter()
    for layer, shape in layer_shapes.items():
        experts_per_shape[shape] += layer_experts[layer]
    total_bytes = sum(s.nbytes * n for s, n in experts_per_shape.items())
    need = sum(s.nbytes * min(min_slots, n) for s, n in experts_per_shape.items())
    if budget_bytes < need:
        raise ConfigError(
            f"an expert cache of {budget_bytes / 1e6:.1f} MB cannot hold one layer's top-{min_slots} experts "
            f"({need / 1e6:.1f} MB needed); raise --cache-gb or --cache-experts"
        )
    plan = {}
    for shape, n in experts_per_shape.items():
        share = budget_bytes * (shape.nbytes * n) / total_bytes
        plan[shape] = max(min(min_slots, n), min(n, int(share // shape.nbytes)))
    return plan


def block_shape(
    components: Sequence[tuple[str, str, Sequence[int]]], activation: mx.Dtype | None = None
) -> BlockShape:
    """Builds a BlockShape from (name, stored dtype, shape) triples; floats held as ``slot_dtype`` says."""
    return BlockShape(tuple(Component(n, d, tuple(s), slot_dtype(d, activation)) for n, d, s in components))
