"""Decode pipelining on the scheduler, on vs off, side by side in one run (every expert cached).

    python benchmarks/bench_pipelining.py                       # like-397b, batch 1 and 4 (~1 min)

With every expert cached a decode step is one lazy graph, so the scheduler can build the next step on
this step's lazy argmax while this one computes (``Scheduler(pipeline=True)``, the default). Both
settings run the same streams in the same process on the published layout (bf16 scales, float32
activations), alternated for ``--rounds`` rounds, best round kept. Appends on ÷ off to results.tsv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, build_pair, load_note, row, synthetic_maker  # noqa: E402

from streamer.generation.sampling import SamplingParams, make_sampler  # noqa: E402
from streamer.generation.scheduler import GenSequence, Scheduler  # noqa: E402
from streamer.loader import load_engine  # noqa: E402
from streamer.settings import RuntimeConfig  # noqa: E402


def tps(model, batch: int, pipeline: bool, steps: int) -> float:
    scheduler = Scheduler(model, max_batch=batch, pipeline=pipeline)
    seqs = [
        GenSequence([5 + i, 6, 7, 8, 9, 10], make_sampler(SamplingParams()), 1 << 30, model.make_cache())
        for i in range(batch)
    ]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(6):  # every prompt read, the batch full
        scheduler.step()
    start = time.perf_counter()
    for _ in range(steps):
        scheduler.step()
    elapsed = time.perf_counter() - start
    for seq in seqs:
        seq.cancel()
    scheduler.step()
    return steps * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="like-397b")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("scratch/bench_batching"))
    args = parser.parse_args()
    packed = build_pair(args.work, args.model, synthetic_maker(args.model))["bf16"][1]
    batches = [int(b) for b in args.batches.split(",")]
    note0, best = load_note(), {}
    with load_engine(packed, RuntimeConfig(cache_bytes=1 << 40)) as engine:
        engine.runtime.preload()
        for _ in range(args.rounds):
            for pipeline in (False, True):
                for b in batches:
                    key = (pipeline, b)
                    best[key] = max(best.get(key, 0.0), tps(engine.model, b, pipeline, args.steps))
    note = f"best of {args.rounds} alternated rounds, {args.steps} steps; {note0} -> {load_note()}"
    rows = []
    for b in batches:
        on, off = best[(True, b)], best[(False, b)]
        config = f"{args.model} bf16 layout, every expert cached, batch {b}"
        rows.append(row(config, "decode tok/s with pipelining (ratio: ÷ without)", on, on / off,
                        f"without {off:.1f} tok/s; {note}"))  # fmt: skip
    append_results(rows)
    for r in rows:
        print("\t".join(r[3:]))


if __name__ == "__main__":
    main()
