"""Offline cache studies: replay a routing trace through simulated expert caches.

A trace is what ``streamer generate --trace`` and ``streamer bench --trace`` write, one JSON line per
layer call in execution order: ``{"pos": P, "layer": l, "experts": [[K ids] per token]}``. Each line is
one *step*: the layer needs the union of its tokens' experts in slots at once (a decode step has one
token, a prefill chunk many). A file named ``*.gz`` is read through gzip (compact traces to keep).

Policies over the same stream of (layer, expert) accesses, per slot pool (layers whose expert blocks have
the same shape share one pool, as in ``ExpertCache``):

- ``simulate`` (and ``simulate_lru`` / ``simulate_lfu``) drives the runtime's own bookkeeping,
  ``experts.slot_book.SlotBook`` with the runtime's policy objects, the way ``ExpertRuntime.begin`` does
  (a step's hits looked up and pinned first, then its misses placed, committed after the step; a step with
  more distinct experts than slots runs in batches of ``slots``), so its hit count is the runtime's with
  ``--prefetch parallel`` and the same ``--cache-policy``.
- ``simulate_optimal`` is Belady's MIN: on a miss, evict the cached expert whose next use is farthest
  away (never one the current step needs). No policy can have more hits on the same stream.

Names: S = slots in a pool, B = a batch of distinct experts needed at once.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamer.errors import StreamerError
from streamer.experts.policy import DEFAULT_POLICY
from streamer.experts.slot_book import SlotBook

Key = tuple[int, int]  # (layer, expert)


class TraceError(StreamerError):
    """A routing trace is missing, empty or has a line that is not a routing record."""


@dataclass(frozen=True)
class Step:
    """One layer call: the distinct experts (sorted) its ``tokens`` tokens routed to."""

    layer: int
    experts: tuple[int, ...]
    tokens: int

    @property
    def is_decode(self) -> bool:
        return self.tokens == 1


def make_step(layer: int, ids: Iterable[Iterable[int]]) -> Step:
    """A Step from a layer's routing ``ids`` [tokens, K] (a numpy array or nested lists)."""
    rows = [list(map(int, r)) for r in ids]
    return Step(int(layer), tuple(sorted({e for r in rows for e in r})), len(rows))


def read_trace(path: str | Path) -> list[Step]:
    """Parses a routing trace file into Steps in execution order.

    Raises:
        TraceError: the file is missing or empty, or a line is not ``{"layer": int, "experts": [[int]]}``.
    """
    return [make_step(layer, ids) for _, layer, ids in trace_records(path)]


def trace_records(path: str | Path) -> Iterator[tuple[int, int, list[list[int]]]]:
    """(line number, layer, expert ids per token) of every record of a trace file, read line by line.

    Raises:
        TraceError: the file is missing or empty, or a line is not ``{"layer": int, "experts": [[int]]}``.
    """
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path}: a directory, not a trace file")
    if not path.is_file():
        raise TraceError(
            f"{path}: no such trace file; record one with `streamer bench MODEL --trace {path}` "
            f"or `streamer generate MODEL ... --trace {path}`"
        )
    seen = False
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:  # .gz: a compressed trace
        for n, line in enumerate(f, 1):
            if line.strip():
                seen = True
                yield (n, *_parse_line(line, path, n))
    if not seen:
        raise TraceError(f"{path}: the trace is empty (no routing records)")


def _parse_line(line: bytes, path: Path, n: int) -> tuple[int, list[list[int]]]:
    try:
        record = json.loads(line)
        layer, ids = record["layer"], record["experts"]
        ok = isinstance(layer, int) and layer >= 0 and isinstance(ids, list) and ids
        ok = ok and all(isinstance(r, list) and r and all(_is_id(e) for e in r) for r in ids)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
        ok = False
    if not ok:
        shown = line.strip()[:80].decode("utf-8", "replace")
        raise TraceError(
            f"{path} line {n}: not a routing record (want "
            f'{{"pos": int, "layer": int, "experts": [[expert ids] per token]}}), got {shown!r}'
        )
    return layer, ids


def _is_id(e) -> bool:
    return isinstance(e, int) and not isinstance(e, bool) and e >= 0


@dataclass
class SimResult:
    """Hits and misses of one simulated run, split into decode steps and prefill steps."""

    decode_hits: int = 0
    decode_misses: int = 0
    prefill_hits: int = 0
    prefill_misses: int = 0
    misses_by_layer: dict[int, int] = field(default_factory=dict)  # decode misses per layer

    def count(self, step: Step, hit: bool) -> None:
        if step.is_decode:
            if hit:
                self.decode_hits += 1
            else:
                self.decode_misses += 1
                self.misses_by_layer[step.layer] = self.misses_by_layer.get(step.layer, 0) + 1
        elif hit:
            self.prefill_hits += 1
        else:
            self.prefill_misses += 1

    def add(self, other: SimResult) -> None:
        self.decode_hits += other.decode_hits
        self.decode_misses += other.decode_misses
        self.prefill_hits += other.prefill_hits
        self.prefill_misses += other.prefill_misses
        for layer, n in other.misses_by_layer.items():
            self.misses_by_layer[layer] = self.misses_by_layer.get(layer, 0) + n

    @property
    def hits(self) -> int:
        return self.decode_hits + self.prefill_hits

    @property
    def misses(self) -> int:
        return self.decode_misses + self.prefill_misses

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def decode_hit_rate(self) -> float:
        return self.decode_hits / max(self.decode_hits + self.decode_misses, 1)


def simulate(
    steps: Sequence[Step],
    slots: int | Mapping[object, int],
    pool_of_layer: Mapping[int, object] | None = None,
    policy: str = DEFAULT_POLICY,
    lookup_first: bool = True,
) -> SimResult:
    """Replays ``steps`` through slot pools run by ``policy`` as ``ExpertCache`` + ``ExpertRuntime`` do.

    Args:
        steps: the access stream (``read_trace``).
        slots: slots of the one pool, or slots per pool id when ``pool_of_layer`` is given.
        pool_of_layer: layer -> pool id (layers with equal block shapes share a pool); None = one pool.
        policy: an eviction policy of ``experts/policy.py`` (``--cache-policy``).
        lookup_first: look up (and pin) all of a step's hits before placing any miss, so a miss never
            evicts an expert the same step needs, as the runtime does; False replays the older one-pass
            order (hits and misses interleaved in id order) for comparison.
    """
    return _per_pool(steps, slots, pool_of_layer, lambda s, n: _book_pool(s, n, policy, lookup_first))


def simulate_lru(
    steps: Sequence[Step],
    slots: int | Mapping[object, int],
    pool_of_layer: Mapping[int, object] | None = None,
    lookup_first: bool = True,
) -> SimResult:
    """``simulate`` with ``--cache-policy lru``."""
    return simulate(steps, slots, pool_of_layer, "lru", lookup_first)


def simulate_lfu(
    steps: Sequence[Step],
    slots: int | Mapping[object, int],
    pool_of_layer: Mapping[int, object] | None = None,
) -> SimResult:
    """``simulate`` with ``--cache-policy lfu`` (least frequently used, with aging)."""
    return simulate(steps, slots, pool_of_layer, "lfu")


def simulate_optimal(
    steps: Sequence[Step],
    slots: int | Mapping[object, int],
    pool_of_layer: Mapping[int, object] | None = None,
) -> SimResult:
    """Belady's MIN over the same stream and pools as ``simulate_lru``: the most hits any policy gets."""
    return _per_pool(steps, slots, pool_of_layer, _optimal_pool)


def _per_pool(steps, slots, pool_of_layer, run) -> SimResult:
    if pool_of_layer is None:
        if not isinstance(slots, int):
            raise ValueError("slots per pool need pool_of_layer")
        return run(list(steps), slots)
    total = SimResult()
    for pool, n in slots.items():
        total.add(run([s for s in steps if pool_of_layer[s.layer] == pool], n))
    return total


def _batches(steps: Sequence[Step], slots: int) -> Iterator[tuple[Step, tuple[int, ...]]]:
    """(step, experts needed at once): a step wider than the pool runs ``slots`` experts at a time."""
    if slots < 1:
        raise ValueError(f"a pool needs at least one slot, got {slots}")
    for step in steps:
        for start in range(0, len(step.experts), slots):
            yield step, step.experts[start : start + slots]


def _book_pool(steps: Sequence[Step], slots: int, policy: str, lookup_first: bool) -> SimResult:
    result = SimResult()
    book = SlotBook(slots, policy)
    for step, batch in _batches(steps, slots):
        keys = [(step.layer, e) for e in batch]
        used: dict[Key, int] = {}
        if lookup_first:  # pass 1: every hit is used and pinned before any miss evicts
            for key in keys:
                if (slot := book.lookup(key)) is not None:
                    book.pin(slot)
                    used[key] = slot
                    result.count(step, hit=True)
        missed = []
        for key in keys:
            if key in used:
                continue
            if (slot := book.lookup(key)) is not None:
                book.pin(slot)
                result.count(step, hit=True)
            else:
                slot, _ = book.allocate()
                missed.append((key, slot))
                result.count(step, hit=False)
            used[key] = slot
        for key, slot in missed:  # committed once the step's reads finish
            book.commit(key, slot)
        for slot in used.values():
            book.unpin(slot)
    return result


def _optimal_pool(steps: Sequence[Step], slots: int) -> SimResult:
    batches = list(_batches(steps, slots))
    next_use = _next_uses(batches)
    result = SimResult()
    cached: dict[Key, int] = {}  # key -> index of its next use
    heap: list[tuple[int, Key]] = []  # (-next use, key); stale entries skipped on pop
    for i, (step, batch) in enumerate(batches):
        keys = [(step.layer, e) for e in batch]
        needed = set(keys)
        for key, nxt in zip(keys, next_use[i], strict=True):
            hit = key in cached
            result.count(step, hit)
            if not hit and len(cached) >= slots:
                _evict_farthest(cached, heap, needed)
            cached[key] = nxt
            heapq.heappush(heap, (-nxt, key))
    return result


def _next_uses(batches: list[tuple[Step, tuple[int, ...]]]) -> list[list[float]]:
    """For every access, the batch index where its key is needed next (inf: never)."""
    seen: dict[Key, float] = {}
    out: list[list[float]] = [[] for _ in batches]
    for i in range(len(batches) - 1, -1, -1):
        step, batch = batches[i]
        keys = [(step.layer, e) for e in batch]
        out[i] = [seen.get(k, math.inf) for k in keys]
        for k in keys:
            seen[k] = i
    return out


def _evict_farthest(cached: dict[Key, float], heap: list, needed: set[Key]) -> None:
    held = []
    while heap:
        neg, key = heapq.heappop(heap)
        if cached.get(key) != -neg:
            continue  # stale: the key was used again or evicted since
        if key in needed:
            held.append((neg, key))
            continue
        del cached[key]
        break
    else:
        raise AssertionError("nothing evictable: a batch never exceeds the pool")
    for item in held:
        heapq.heappush(heap, item)


def distinct_experts(steps: Iterable[Step]) -> int:
    """How many different (layer, expert) pairs the stream touches."""
    return len({(s.layer, e) for s in steps for e in s.experts})


def decode_tokens(steps: Sequence[Step]) -> int:
    """Decode tokens in the trace: decode steps of the first layer seen."""
    first = steps[0].layer if steps else 0
    return sum(1 for s in steps if s.is_decode and s.layer == first)
