"""The pipeline's wire protocol and its two roles: rank 0 drives (``PipelinedModel``), the others serve.

Every hop goes to the next rank around the ring (rank r sends to r+1, the last rank to rank 0). A message
is an int32 header, then (when the header says so) a JSON blob, then for a model call the hidden states.
Rank 0 embeds and runs its stage, the hidden states [B, L, H] go through every other stage and come back
for the output head; stats and snapshots go around the same way, each rank adding its part to the blob.
Every wait is bounded (``timeout_s``): a rank that stops answering ends this one.

Each rank keeps every live sequence's state for its own layers under the sequence's cache id, and
snapshots of it under snapshot ids, so rank 0's scheduler batches, resumes and forks sequences exactly as
on one process (``batch_caches``, ``ragged_caches``, ``snapshot_caches``, the prefix cache). When rank 0
drops a sequence's caches or a snapshot, its id is freed on every rank with the next message.

Dimensions: B = sequences, L = positions, H = hidden size, G = prompts end to end in one row.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from streamer.distributed.stage import Stage
from streamer.errors import StreamerError
from streamer.loader import Engine
from streamer.models.layer_cache import CacheBatch, batch_caches, ragged_caches, snapshot_arrays
from streamer.models.qwen3_5_moe import Model, last_positions

OP_CALL, OP_STATS, OP_STOP, OP_SNAPSHOT, OP_RESTORE = 1, 2, 3, 4, 5
HEADER = 6  # op, cache id, B (or snapshot id), L, last_only, blob bytes
COUNTERS = ("cache_hits", "cache_misses", "bytes_read", "stall_s", "prefetch_issued", "prefetch_used",
            "predicted", "predicted_right", "cache_bytes", "evictions")  # fmt: skip


class PipelineError(StreamerError):
    """A peer rank closed the connection, or the ranks disagree about the protocol."""


def exit_now(message: str) -> None:
    """Prints ``streamer: message`` and ends the process at once (exit status 1).

    A blocked recv inside MLX cannot be interrupted from Python: ending the process is the only way out."""
    sys.stderr.write(f"streamer: {message}\n")
    sys.stderr.flush()
    os._exit(1)


class Link:
    """Bounded sends to the next rank and receives from the previous one.

    Args:
        group: the ``mx.distributed`` group.
        on_lost: called with the message when a peer closes the connection (e.g. to end a server at once:
            a pipeline without one of its ranks can answer nothing more); by default PipelineError is raised.
        timeout_s: the longest one send or receive may wait; then ``on_timeout(message)`` runs (by default
            it prints the message and ends the process).
    """

    def __init__(
        self,
        group,
        timeout_s: float,
        on_timeout: Callable[[str], None] = exit_now,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.timeout_s = timeout_s
        self.on_timeout, self.on_lost = on_timeout, on_lost
        self.wait_s = 0.0  # time spent in receives (waiting on the other stages and the wire)
        self.bytes_sent = 0
        self.broken = False  # a peer is gone: nothing more is sent
        self._watchdog = _Watchdog(self)

    def send(self, x: mx.array) -> None:
        self._bounded(mx.distributed.send(x, self.next, group=self.group), self.next, "sending to")
        self.bytes_sent += x.nbytes

    def recv(self, shape: tuple, dtype: mx.Dtype) -> mx.array:
        out = mx.distributed.recv(shape, dtype, self.prev, group=self.group)
        start = time.perf_counter()
        self._bounded(out, self.prev, "waiting for")
        self.wait_s += time.perf_counter() - start
        return out

    def send_header(self, *fields: int) -> None:
        self.send(mx.array(list(fields) + [0] * (HEADER - len(fields)), dtype=mx.int32))

    def recv_header(self) -> list[int]:
        return self.recv((HEADER,), mx.int32).tolist()

    def _bounded(self, x: mx.array, peer: int, what: str) -> None:
        self._watchdog.arm(peer, what)
        try:
            mx.eval(x)
        except RuntimeError as e:
            self.broken = True
            message = f"rank {self.rank}: lost the connection to rank {peer} ({e})"
            if self.on_lost is not None:
                self.on_lost(message)
            raise PipelineError(message) from None
        finally:
            self._watchdog.disarm()


class _Watchdog:
    """Ends a wait on a peer that takes longer than ``timeout_s``: one thread for all of a link's sends and
    receives (a timer thread per message cost ~0.1 ms each, several per step)."""

    def __init__(self, link: Link):
        self.link = link
        self._wait: tuple[float, int, str] | None = None  # (deadline, peer, what), replaced whole
        self._tick = min(0.25, link.timeout_s / 4)
        threading.Thread(target=self._watch, name="streamer-pipeline-watchdog", daemon=True).start()

    def arm(self, peer: int, what: str) -> None:
        self._wait = (time.monotonic() + self.link.timeout_s, peer, what)

    def disarm(self) -> None:
        self._wait = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            wait = self._wait
            if wait is not None and time.monotonic() > wait[0]:
                link, (_, peer, what) = self.link, wait
                link.on_timeout(
                    f"rank {link.rank}: rank {peer} did not answer within {link.timeout_s:g} s ({what} it); "
                    "stopping (a stopped or unreachable peer; raise --pipeline-timeout if a step can take "
                    "longer)"
                )
                return


def rank_stats(stage: Stage, link: Link, held: tuple[int, int] | None = None) -> dict:
    """This rank's entry in ``stats["ranks"]``: its layers and counters, and for a serving rank ``held``:
    how many sequences' states and snapshots it keeps for rank 0."""
    s = stage.runtime.snapshot_stats()
    looked = s["cache_hits"] + s["cache_misses"]
    return {
        "rank": link.rank,
        "layers": [stage.layers[0], stage.layers[-1]],
        **s,
        "hit_rate": s["cache_hits"] / looked if looked else 0.0,
        "mb_read": s["bytes_read"] / 1e6,
        "net_wait_s": link.wait_s,
        "bytes_sent": link.bytes_sent,
        **({"sequences_held": held[0], "snapshots_held": held[1]} if held else {}),
    }


class StageCache(list):
    """Rank 0's layer caches for one sequence; ``cache_id`` names the other ranks' state for it.

    ``snapshot`` / ``restore`` (what ``snapshot_caches`` / ``restore_caches`` call) and ``snapshot_remote``
    / ``restore_remote`` (what the prefix cache calls) take the other ranks' layers along.
    """

    def __init__(self, caches: list, cache_id: int, model: PipelinedModel):
        super().__init__(caches)
        self.cache_id, self._model = cache_id, model
        weakref.finalize(self, model._freed_caches.append, cache_id)

    def snapshot(self) -> StageSnapshot:
        return StageSnapshot([c.snapshot() for c in self], self.snapshot_remote())

    def restore(self, snap: StageSnapshot) -> None:
        if not isinstance(snap, StageSnapshot):
            raise PipelineError("this state was not taken from a pipelined model's caches")
        for c, s in zip(self, snap, strict=True):
            c.restore(s)
        self.restore_remote(snap.remote)

    def snapshot_remote(self) -> RemoteState:
        return self._model._snapshot(self.cache_id)

    def restore_remote(self, remote: RemoteState) -> None:
        self._model._restore(remote, self.cache_id)


class RemoteState:
    """The other ranks' snapshot of one sequence's layers, kept there under ``snap_id`` while this lives."""

    def __init__(self, snap_id: int, nbytes: int, model: PipelinedModel):
        self.snap_id, self.nbytes = snap_id, nbytes  # bytes summed over the other ranks
        weakref.finalize(self, model._freed_snaps.append, snap_id)


class StageSnapshot(list):
    """Rank 0's layer snapshots of one sequence, and the other ranks' (``remote``)."""

    def __init__(self, snaps: list, remote: RemoteState):
        super().__init__(snaps)
        self.remote = remote


class PipelinedModel:
    """Rank 0's model: ``Model``'s interface (``__call__``, ``make_cache``, ``state_bytes``), run across
    the ranks, for single sequences, batches (``batch_caches``) and prompts end to end (``ragged_caches``).
    """

    def __init__(self, stage: Stage, link: Link):
        self.stage, self.link = stage, link
        self.args, self.dtype = stage.args, stage.model.dtype
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one message around the ring at a time
        # Ids dropped here (finalizers may run on any thread): freed on the other ranks with the next message.
        self._freed_caches: collections.deque[int] = collections.deque()
        self._freed_snaps: collections.deque[int] = collections.deque()
        self._stopped = False

    state_bytes = Model.state_bytes  # every rank's layers: what the sequence costs the whole pipeline

    def make_cache(self) -> StageCache:
        return StageCache(self.stage.make_cache(), next(self._ids), self)

    def __call__(self, tokens: mx.array, cache: list | None = None, last_only: bool = False) -> mx.array:
        """Logits [B, L, V] (with ``last_only``: [B, 1, V], or [1, G, V] for a ragged batch) — what
        ``Model`` gives on one process.

        Raises:
            PipelineError: a peer is gone, or ``cache`` is not made of this model's ``make_cache()``.
        """
        cache = self.make_cache() if cache is None else cache
        if isinstance(cache, CacheBatch):
            sequences, lengths = cache.sequences, cache.lengths
        else:
            sequences, lengths = [cache], None
        if not all(isinstance(s, StageCache) for s in sequences):
            raise PipelineError("a pipelined model runs on the caches of its own make_cache()")
        B, L = tokens.shape
        h = self.stage.run(self.stage.embed(tokens), cache)
        mx.eval(h, [c.state for s in sequences for c in s])
        blob = {"ids": [s.cache_id for s in sequences], "lengths": lengths} if len(sequences) > 1 else {}
        if last_only:
            out_len = len(lengths) if lengths else 1
        else:
            out_len = L
        with self._lock:
            self._send(OP_CALL, (sequences[0].cache_id, B, L, int(last_only)), blob)
            self.link.send(h)
            self._receive(OP_CALL)
            h = self.link.recv((B, out_len, self.args.hidden_size), self.dtype)
        return self.stage.head(h)

    def gather_stats(self) -> list[dict]:
        """Every rank's ``rank_stats`` entry, in rank order."""
        with self._lock:
            self._send(OP_STATS, (), {"ranks": [rank_stats(self.stage, self.link)]})
            return self._receive(OP_STATS)[1]["ranks"]

    def _snapshot(self, cache_id: int) -> RemoteState:
        with self._lock:
            snap_id = next(self._ids)
            self._send(OP_SNAPSHOT, (cache_id, snap_id), {"bytes": 0})
            return RemoteState(snap_id, self._receive(OP_SNAPSHOT)[1]["bytes"], self)

    def _restore(self, remote: RemoteState, cache_id: int) -> None:
        with self._lock:
            self._send(OP_RESTORE, (cache_id, remote.snap_id), {})
            self._receive(OP_RESTORE)

    def stop(self) -> None:
        """Tells every other rank to finish; returns when the message has gone around the ring. Once."""
        with self._lock:
            if self.link.broken or self._stopped:
                return
            self._stopped = True
            self._send(OP_STOP, (), {})
            self._receive(OP_STOP)

    def _send(self, op: int, fields: tuple, blob: dict) -> None:
        freed = _drain(self._freed_caches), _drain(self._freed_snaps)
        if freed[0] or freed[1]:
            blob = {**blob, "free": freed[0], "free_snaps": freed[1]}
        send_message(self.link, [op, *fields], blob)

    def _receive(self, op: int) -> tuple[list[int], dict]:
        header, blob = receive_message(self.link)
        return _expect(header, op, self.link), blob


def _drain(ids: collections.deque) -> list[int]:
    out = []
    while ids:
        out.append(ids.popleft())
    return out


def send_message(link: Link, fields: list[int], blob: dict) -> None:
    """A header with ``fields`` and, if ``blob`` is not empty, the blob as JSON."""
    data = json.dumps(blob).encode() if blob else b""
    link.send_header(*fields[: HEADER - 1], *[0] * (HEADER - 1 - len(fields)), len(data))
    if data:
        link.send(mx.array(np.frombuffer(data, dtype=np.uint8)))


def receive_message(link: Link) -> tuple[list[int], dict]:
    header = link.recv_header()
    blob = json.loads(bytes(np.array(link.recv((header[-1],), mx.uint8)))) if header[-1] else {}
    return header, blob


def _expect(header: list[int], op: int, link: Link) -> list[int]:
    if header[0] != op:
        raise PipelineError(
            f"rank {link.rank}: expected message {op} from rank {link.prev}, got {header[0]} "
            "(the ranks run different commands or versions?)"
        )
    return header


class StageState:
    """A serving rank's state for its layers: each live sequence's caches and each kept snapshot, by id."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.caches: dict[int, list] = {}
        self.snaps: dict[int, list] = {}

    def caches_of(self, cache_id: int) -> list:
        if cache_id not in self.caches:
            self.caches[cache_id] = self.stage.make_cache()
        return self.caches[cache_id]

    def free(self, blob: dict) -> None:
        for i in blob.get("free", ()):
            self.caches.pop(i, None)
        for i in blob.get("free_snaps", ()):
            self.snaps.pop(i, None)

    def snapshot(self, cache_id: int, snap_id: int) -> int:
        """Keeps a copy of the sequence's layer state (copies, so the snapshot does not pin the live
        buffers); returns its bytes."""
        copies = [_copied(c.snapshot()) for c in self.caches_of(cache_id)]
        arrays = [a for s in copies for a in snapshot_arrays(s)]
        mx.eval(arrays)
        self.snaps[snap_id] = copies
        return sum(a.nbytes for a in arrays)

    def restore(self, cache_id: int, snap_id: int) -> None:
        caches = self.caches[cache_id] = self.stage.make_cache()
        for c, s in zip(caches, self.snaps[snap_id], strict=True):
            c.restore(s)


def _copied(snap):
    """``snap`` (a frozen dataclass) with its arrays copied out of the live cache buffers."""
    arrays = {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}
    return dataclasses.replace(
        snap, **{k: mx.contiguous(v) for k, v in arrays.items() if isinstance(v, mx.array)}
    )


def serve_stage(stage: Stage, link: Link, fault: Callable[[int], None] | None = None) -> None:
    """A rank other than 0: runs its stage on every hidden state that comes, until rank 0 says stop.

    ``fault`` is a test hook, called with the number of each model call before it runs.
    """
    state = StageState(stage)
    last = link.rank == link.size - 1
    calls = 0
    while True:
        header, blob = receive_message(link)
        state.free(blob)
        op = header[0]
        if op == OP_STOP:
            send_message(link, header[:-1], blob)
            return
        if op == OP_STATS:
            blob["ranks"].append(rank_stats(stage, link, (len(state.caches), len(state.snaps))))
        elif op == OP_SNAPSHOT:
            blob["bytes"] += state.snapshot(header[1], header[2])
        elif op == OP_RESTORE:
            state.restore(header[1], header[2])
        elif op == OP_CALL:
            calls += 1
            if fault is not None:
                fault(calls)
            h = _run_call(state, link, header, blob, last)
            send_message(link, header[:-1], blob)
            link.send(h)
            continue
        else:
            raise PipelineError(f"rank {link.rank}: unknown message {op} from rank {link.prev}")
        send_message(link, header[:-1], blob)


def _run_call(state: StageState, link: Link, header: list[int], blob: dict, last: bool) -> mx.array:
    _, cache_id, B, L, last_only, _ = header
    rows = [state.caches_of(i) for i in blob.get("ids", [cache_id])]
    lengths = blob.get("lengths")
    if lengths:
        cache = ragged_caches(rows, lengths)
    elif len(rows) > 1:
        cache = batch_caches(rows)
    else:
        cache = rows[0]
    h = link.recv((B, L, state.stage.args.hidden_size), state.stage.model.dtype)
    h = state.stage.run(h, cache)
    if last and last_only:  # as Model.__call__ does before the head
        h = last_positions(h, cache)
    mx.eval(h, [c.state for row in rows for c in row])
    return h


class PipelinedEngine(Engine):
    """Rank 0's ``Engine``: the pipelined model; ``stats()`` sums every rank's counters and lists each."""

    def stats(self) -> dict:
        ranks = self.model.gather_stats()
        total = {k: sum(r[k] for r in ranks) for k in COUNTERS}
        return {**total, "routing": dict(self.routing), "ranks": ranks}

    def close(self) -> None:
        try:
            self.model.stop()
        finally:
            super().close()


def make_engine(stage: Stage, link: Link, tokenizer, path) -> PipelinedEngine:
    """Rank 0's engine around its stage."""
    model = PipelinedModel(stage, link)
    return PipelinedEngine(model, stage.args, tokenizer, path, stage.runtime, routing=dict(stage.routing))
