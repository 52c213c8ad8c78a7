"""The pipeline's wire protocol and its two roles: rank 0 drives (``PipelinedModel``), the others serve.

Every hop goes to the next rank around the ring (rank r sends to r+1, the last rank to rank 0) as an
int32 header then a payload. Rank 0 embeds and runs its stage, the hidden states [B, L, H] go through
every other stage and come back for the output head; stats are gathered the same way, each rank adding
its entry to a JSON list. Every wait is bounded (``timeout_s``): a rank that stops answering ends this one.

Dimensions: B = sequences (1), L = positions, H = hidden size.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from streamer.distributed.stage import Stage
from streamer.errors import StreamerError
from streamer.loader import Engine
from streamer.models.qwen3_5_moe import Model

OP_CALL, OP_STATS, OP_STOP = 1, 2, 3
HEADER = 5  # op, cache id (or payload bytes), B, L, last_only
KEPT_CACHES = 4  # sequences a serving rank keeps state for (a batch of one: only the latest is live)
COUNTERS = ("cache_hits", "cache_misses", "bytes_read", "stall_s", "prefetch_issued", "prefetch_used",
            "predicted", "predicted_right", "cache_bytes", "evictions")  # fmt: skip


class PipelineError(StreamerError):
    """A peer rank closed the connection, or the ranks disagree about the protocol."""


def _exit_unanswered(message: str) -> None:
    # A blocked recv inside MLX cannot be interrupted from Python: ending the process is the only way out.
    sys.stderr.write(f"streamer: {message}\n")
    sys.stderr.flush()
    os._exit(1)


class Link:
    """Bounded sends to the next rank and receives from the previous one.

    Args:
        group: the ``mx.distributed`` group.
        timeout_s: the longest one send or receive may wait; then ``on_timeout(message)`` runs (by default
            it prints the message and ends the process).
    """

    def __init__(self, group, timeout_s: float, on_timeout: Callable[[str], None] = _exit_unanswered):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout
        self.wait_s = 0.0  # time spent in receives (waiting on the other stages and the wire)
        self.bytes_sent = 0
        self.broken = False  # a peer is gone: nothing more is sent

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
        timer = threading.Timer(
            self.timeout_s,
            self.on_timeout,
            (f"rank {self.rank}: rank {peer} did not answer within {self.timeout_s:g} s ({what} it); "
             "stopping (a stopped or unreachable peer; raise --pipeline-timeout if a step can take longer)",),
        )  # fmt: skip
        timer.daemon = True
        timer.start()
        try:
            mx.eval(x)
        except RuntimeError as e:
            self.broken = True
            raise PipelineError(f"rank {self.rank}: lost the connection to rank {peer} ({e})") from None
        finally:
            timer.cancel()


def rank_stats(stage: Stage, link: Link) -> dict:
    """This rank's entry in ``stats["ranks"]``: its layers and counters."""
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
    }


class StageCache(list):
    """Rank 0's layer caches for one sequence; ``cache_id`` names the other ranks' state for it."""

    def __init__(self, caches: list, cache_id: int):
        super().__init__(caches)
        self.cache_id = cache_id


class PipelinedModel:
    """Rank 0's model: ``Model``'s interface (``__call__``, ``make_cache``, ``state_bytes``), run across
    the ranks. One sequence at a time (a batch of one)."""

    def __init__(self, stage: Stage, link: Link):
        self.stage, self.link = stage, link
        self.args, self.dtype = stage.args, stage.model.dtype
        self._next_id = 0

    state_bytes = Model.state_bytes  # every rank's layers: what the sequence costs the whole pipeline

    def make_cache(self) -> StageCache:
        self._next_id += 1
        return StageCache(self.stage.make_cache(), self._next_id)

    def __call__(
        self, tokens: mx.array, cache: StageCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [B, L, V], or [B, 1, V] with ``last_only`` — what ``Model`` gives on one process.

        Raises:
            PipelineError: a peer is gone, or ``cache`` is not one of ``make_cache()`` (batched or
                ragged caches: the pipeline runs a batch of one).
        """
        cache = self.make_cache() if cache is None else cache
        if not isinstance(cache, StageCache):
            raise PipelineError(
                "a pipelined model runs one sequence at a time (the caches of make_cache()); "
                "run with --max-batch 1, or on one process"
            )
        B, L = tokens.shape
        h = self.stage.run(self.stage.embed(tokens), cache)
        mx.eval(h, [c.state for c in cache])
        self.link.send_header(OP_CALL, cache.cache_id, B, L, int(last_only))
        self.link.send(h)
        _expect(self.link.recv_header(), OP_CALL, self.link)
        h = self.link.recv((B, 1 if last_only else L, self.args.hidden_size), self.dtype)
        return self.stage.head(h)

    def gather_stats(self) -> list[dict]:
        """Every rank's ``rank_stats`` entry, in rank order."""
        blob = json.dumps([rank_stats(self.stage, self.link)]).encode()
        _send_blob(self.link, blob)
        header = _expect(self.link.recv_header(), OP_STATS, self.link)
        return json.loads(bytes(np.array(self.link.recv((header[1],), mx.uint8))))

    def stop(self) -> None:
        """Tells every other rank to finish; returns when the message has gone around the ring."""
        if self.link.broken:
            return
        self.link.send_header(OP_STOP)
        _expect(self.link.recv_header(), OP_STOP, self.link)


def _send_blob(link: Link, blob: bytes) -> None:
    link.send_header(OP_STATS, len(blob))
    link.send(mx.array(np.frombuffer(blob, dtype=np.uint8)))


def _expect(header: list[int], op: int, link: Link) -> list[int]:
    if header[0] != op:
        raise PipelineError(
            f"rank {link.rank}: expected message {op} from rank {link.prev}, got {header[0]} "
            "(the ranks run different commands or versions?)"
        )
    return header


def serve_stage(stage: Stage, link: Link, fault: Callable[[int], None] | None = None) -> None:
    """A rank other than 0: runs its stage on every hidden state that comes, until rank 0 says stop.

    ``fault`` is a test hook, called with the number of each model call before it runs.
    """
    caches: dict[int, list] = {}
    last = link.rank == link.size - 1
    calls = 0
    while True:
        header = link.recv_header()
        op = header[0]
        if op == OP_STOP:
            link.send_header(OP_STOP)
            return
        if op == OP_STATS:
            entries = json.loads(bytes(np.array(link.recv((header[1],), mx.uint8))))
            _send_blob(link, json.dumps([*entries, rank_stats(stage, link)]).encode())
            continue
        if op != OP_CALL:
            raise PipelineError(f"rank {link.rank}: unknown message {op} from rank {link.prev}")
        _, cache_id, B, L, last_only = header
        calls += 1
        if fault is not None:
            fault(calls)
        if cache_id not in caches:
            caches[cache_id] = stage.make_cache()
            for old in sorted(caches)[:-KEPT_CACHES]:
                del caches[old]
        h = link.recv((B, L, stage.args.hidden_size), stage.model.dtype)
        h = stage.run(h, caches[cache_id])
        if last and last_only:
            h = h[:, -1:, :]  # as Model.__call__ does before the head
        mx.eval(h, [c.state for c in caches[cache_id]])
        link.send_header(*header)
        link.send(h)


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
