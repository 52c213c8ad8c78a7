"""``streamer bench``: prompt and decode speed of one model on this machine, with cache and I/O telemetry.

A run prefills a fixed prompt, then decodes a fixed number of tokens greedily (EOS does not stop it: the
point is speed), and splits the runtime's counters into the two phases. The routing can be written as a
trace for ``streamer advise``. ``measure_read_gbps`` times random whole-block reads of the model's own
expert files, the number ``advise`` turns misses into seconds with.

Names: T = prompt tokens, N = decode tokens.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.generation.scheduler import PREFILL_CHUNK, GenSequence, Scheduler
from streamer.loader import Engine
from streamer.storage.packed import open_packed

# Mixed prose and code, so a trained model routes the way it does on real input.
BENCH_TEXT = (
    "The expert cache keeps the most recently used experts of every layer in memory and reads the rest "
    "from the disk. def read_block(fd, offset, buffers):\n    return os.preadv(fd, buffers, offset)\n"
    "A mixture-of-experts model runs only a few of its experts for each token, so a machine with less "
    "memory than the model can still run it, as fast as its disk allows. for layer in range(60):\n"
    "    hits, misses = cache.lookup(layer, experts)\n"
)


@dataclass
class PhaseStats:
    """What one phase (prompt or decode) did: tokens, seconds and the expert runtime's counters."""

    tokens: int
    seconds: float
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0

    @property
    def tps(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_json(self) -> dict:
        looked = self.cache_hits + self.cache_misses
        return {
            **asdict(self),
            "tps": self.tps,
            "hit_rate": self.cache_hits / looked if looked else None,
            "read_gbps": self.bytes_read / 1e9 / max(self.seconds, 1e-9),
            "stall_share": self.stall_s / max(self.seconds, 1e-9),
        }


def bench_prompt(engine: Engine, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of BENCH_TEXT (repeated as needed) in the model's own tokenizer."""
    ids = engine.tokenizer.encode(BENCH_TEXT)
    vocab = engine.args.vocab_size
    if not ids or max(ids) >= vocab:  # a tokenizer that does not fit the model: fall back to fixed ids
        ids = random.Random(0).choices(range(vocab), k=max(n_tokens, 1))
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def run_bench(
    engine: Engine,
    prompt: list[int],
    decode_tokens: int,
    on_route: Callable | None = None,
    chunk: int = PREFILL_CHUNK,
    concurrency: int = 1,
) -> dict:
    """Prefills ``concurrency`` streams, decodes ``decode_tokens`` each greedily; returns the phases as JSON.

    The streams run together on the scheduler, as ``serve`` runs concurrent requests: stream i reads
    ``prompt`` rotated by i positions (the same length, different routing). The prompt phase ends when
    every stream has its first token; the decode phase is the ``decode_tokens - 1`` batched steps after
    it, so its tokens are ``concurrency × (decode_tokens - 1)``. ``on_route(layer, ids [tokens, K])``
    sees every routing decision (e.g. a trace writer).
    """
    if not prompt or decode_tokens < 1:
        raise ValueError("a bench needs a prompt and at least one decode token")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    runtime = engine.runtime
    if runtime is not None:
        runtime.on_route = on_route
    model = engine.model
    scheduler = Scheduler(model, max_batch=concurrency, prefill_chunk=chunk)
    streams = [
        # EOS does not stop a stream: the point is speed. max_tokens is never reached: the run stops them.
        GenSequence(prompt[i:] + prompt[:i], make_sampler(SamplingParams()), 1 << 30, model.make_cache())
        for i in range(concurrency)
    ]
    try:
        start, before = time.perf_counter(), engine.stats()
        for seq in streams:
            scheduler.add(seq)
        while any(not seq.tokens for seq in streams):
            scheduler.step()
            _raise_failure(streams)
        mid, middle = time.perf_counter(), engine.stats()
        steps_before, tokens_before = scheduler.decode_steps, sum(len(seq.tokens) for seq in streams)
        while scheduler.decode_steps - steps_before < decode_tokens - 1:
            scheduler.step()
            _raise_failure(streams)
        end, after = time.perf_counter(), engine.stats()
        decoded = sum(len(seq.tokens) for seq in streams) - tokens_before
    finally:
        for seq in streams:
            seq.cancel()
        scheduler.step()  # the cancelled streams leave
        if runtime is not None:
            runtime.on_route = None
    prompt_phase = _phase(len(prompt) * concurrency, mid - start, before, middle)
    decode_phase = _phase(decoded, end - mid, middle, after)
    return {
        "model": str(engine.path),
        "streamed": runtime is not None,
        "concurrency": concurrency,
        "cache_bytes": after.get("cache_bytes"),
        **({"ranks": after["ranks"]} if "ranks" in after else {}),  # a pipeline: each rank, run totals
        "expert_bytes": runtime.packed.manifest.expert_bytes if runtime else None,
        "prompt": prompt_phase.to_json(),
        "decode": decode_phase.to_json(),
        "compute_ms_per_token": 1000
        * (decode_phase.seconds - decode_phase.stall_s)
        / max(decode_phase.tokens, 1),
    }


def _raise_failure(streams: list[GenSequence]) -> None:
    for seq in streams:
        if seq.error is not None:
            raise seq.error


def _phase(tokens: int, seconds: float, before: dict, after: dict) -> PhaseStats:
    delta = {
        k: after[k] - before[k] for k in ("cache_hits", "cache_misses", "bytes_read", "stall_s") if k in after
    }
    return PhaseStats(tokens, seconds, **delta)


def measure_read_gbps(packed_dir: str | Path, seconds: float = 2.0, threads: int = 8) -> tuple[float, str]:
    """Random whole-block reads of a packed model's expert files for about ``seconds``: (GB/s, io mode).

    Uses direct I/O where the filesystem allows it (else the result includes page-cache hits: the mode
    says which), with ``threads`` readers as the runtime uses.
    """
    packed = open_packed(packed_dir)
    layers = packed.manifest.layers
    mode, fds = "direct", _open_layers(packed, direct=True)
    if fds is None:
        mode, fds = "buffered", _open_layers(packed, direct=False)
    rng = random.Random(0)
    deadline = time.perf_counter() + seconds

    def reader(seed: int) -> int:
        local, total = random.Random(seed), 0
        buf = mmap.mmap(-1, max(e.block_bytes for e in layers))  # page aligned, as O_DIRECT needs
        while time.perf_counter() < deadline:
            entry = local.choice(layers)
            view = memoryview(buf)[: entry.block_bytes]
            total += os.preadv(
                fds[entry.layer], [view], entry.block_offset(local.randrange(entry.num_experts))
            )
        return total

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(reader, [rng.randrange(1 << 30) for _ in range(threads)]))
    finally:
        for fd in fds.values():
            os.close(fd)
    return total / 1e9 / (time.perf_counter() - start), mode


def _open_layers(packed, direct: bool) -> dict[int, int] | None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct and sys.platform.startswith("linux") else 0)
    fds: dict[int, int] = {}
    try:
        for entry in packed.manifest.layers:
            fds[entry.layer] = os.open(packed.path / entry.file, flags)
            if direct and sys.platform == "darwin":  # pragma: no cover - macOS only
                import fcntl

                fcntl.fcntl(fds[entry.layer], 48, 1)  # F_NOCACHE
    except OSError:
        for fd in fds.values():
            os.close(fd)
        if direct:
            return None
        raise
    return fds
