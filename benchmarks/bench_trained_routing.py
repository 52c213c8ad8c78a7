"""P4 on trained routing: default policy, LRU and optimal hit rates at 10/30/50 % of the experts, for both
trained models on held-out text, next to random-weight models of the same routing shapes.

    python benchmarks/bench_trained_routing.py                  # record traces, simulate, append results
    python benchmarks/bench_trained_routing.py --from-traces    # replay the committed traces only

Models (all teacher-forced: a 64-token prompt, then each following token fed as a decode step):
  demo            the shipped demo: 8 layers, 64 experts top-8, trained on the Python standard library
  routing-study   tools/train_demo.py --preset routing-study: 4 layers, 256 experts top-10 (the 397B's
                  routing in miniature: it has 512 top-10); exported and packed at --study
  like-35b, like-397b   random weights, 8 layers, 64 top-8 / 128 top-10 (random token ids)
  routing-study-random  the routing-study geometry with random weights (random token ids)
Held-out text for the trained models: this repository's streamer/ sources (neither model trained on
them). Routing does not depend on the cache in exact mode, so each trace is recorded once (every expert
cached) and replayed through the runtime's own slot bookkeeping (``tuning/cache_sim.simulate``: SlotBook
and the runtime's policy objects) with one pool of share x (layers x experts) slots, for lfu (the
default), lru, and Belady's optimal. Hit rates count decode steps (the prompt warms the cache).
The trained models' traces are written to benchmarks/traces/<model>-heldout.jsonl.gz (committed;
``streamer advise`` reads them). Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, row  # noqa: E402

from streamer.experts.policy import DEFAULT_POLICY
from streamer.generation.generate import prefill
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.tuning.cache_sim import read_trace, simulate, simulate_optimal

REPO = Path(__file__).resolve().parents[1]
TRACES = Path(__file__).parent / "traces"
STUDY = REPO / "scratch" / "routing-study" / "packed"
WORK = Path("/tmp/streamer-bench-trained-routing")
SHARES = (0.1, 0.3, 0.5)
TRAINED = ("demo", "routing-study")
RANDOM = ("like-35b", "like-397b", "routing-study-random")
POLICIES = (DEFAULT_POLICY, "lru") if DEFAULT_POLICY == "lfu" else (DEFAULT_POLICY, "lfu", "lru")


def held_out_ids(tokenizer, n: int) -> list[int]:
    """This repository's own Python sources: code neither trained model saw."""
    files = sorted((REPO / "streamer").rglob("*.py"))
    ids = tokenizer.encode("\n".join(f.read_text() for f in files))
    assert len(ids) >= n, f"only {len(ids)} tokens of held-out text"
    return ids[:n]


def packed_model(name: str, study: Path) -> Path:
    if name == "demo":
        from streamer.cli.options import resolve_model

        return resolve_model(None)
    if name == "routing-study":
        if not (study / "manifest.json").exists():
            sys.exit(
                f"{study}: no packed routing-study model; train and export it with "
                "tools/train_demo.py --preset routing-study --out scratch/routing-study --export "
                "scratch/routing-study/checkpoint-export, then streamer repack that directory to "
                f"{study} (or pass --from-traces)"
            )
        return study
    return random_model(name, study)


def random_model(name: str, study: Path) -> Path:
    from streamer.storage.repack import run_repack
    from streamer.storage.repack_plan import make_plan
    from streamer.synthetic.presets import Preset, get_preset
    from streamer.synthetic.writer import generate

    dst = WORK / f"{name}-packed"
    if (dst / "manifest.json").exists():
        return dst
    src = WORK / f"{name}-src"
    if name == "routing-study-random":  # the trained study model's exact config, random weights
        text_config = json.loads((study / "config.json").read_text())["text_config"]
        preset = Preset(name, "routing-study geometry, random weights", text_config)
    else:
        preset = get_preset(name, num_layers=8)
    if not src.exists():
        generate(src, preset, dtype="float32", seed=0)
    run_repack(make_plan(src, dst))
    return dst


def record(packed: Path, name: str, n_prompt: int, n_decode: int) -> list[tuple[int, list]]:
    """(layer, ids [tokens, K]) of every routing decision, teacher-forced, every expert cached."""
    calls = []
    with load_engine(packed, RuntimeConfig(cache_experts=10**7)) as engine:
        engine.runtime.on_route = lambda layer, ids: calls.append((layer, ids.tolist()))
        if name in TRAINED:
            ids = held_out_ids(engine.tokenizer, n_prompt + n_decode)
        else:
            ids = random.Random(0).choices(range(engine.args.vocab_size), k=n_prompt + n_decode)
        cache = engine.model.make_cache()
        mx.eval(prefill(engine.model, ids[:n_prompt], cache))
        for tok in ids[n_prompt:]:
            mx.eval(engine.model(mx.array([[tok]]), cache=cache))
    return calls


def write_trace(path: Path, calls: list[tuple[int, list]]) -> None:
    """The ``streamer --trace`` format, gzipped (``read_trace`` reads ``*.gz``)."""
    pos, step_tokens = 0, 0
    with gzip.open(path, "wt") as f:
        for layer, ids in calls:
            if layer == 0:
                pos, step_tokens = pos + step_tokens, len(ids)
            f.write(json.dumps({"pos": pos, "layer": layer, "experts": ids}, separators=(",", ":")) + "\n")


def curve(steps) -> list[dict]:
    """Hit rates per share: each policy and optimal, one pool of share x all experts."""
    layers = sorted({s.layer for s in steps})
    width = max(max(s.experts) for s in steps) + 1  # experts per layer (every id appears in a long trace)
    top_k = max(len(s.experts) for s in steps if s.is_decode)
    out = []
    for share in SHARES:
        slots = max(top_k, round(share * len(layers) * width))
        rates = {p: simulate(steps, slots, policy=p).decode_hit_rate for p in POLICIES}
        out.append(
            {
                "share": share,
                "slots": slots,
                **rates,
                "optimal": simulate_optimal(steps, slots).decode_hit_rate,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=STUDY, help="the packed routing-study model")
    ap.add_argument("--models", default=",".join(TRAINED + RANDOM))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=768)
    ap.add_argument("--from-traces", action="store_true", help="replay benchmarks/traces/ only")
    ap.add_argument("--no-record", action="store_true", help="do not append to results.tsv")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    TRACES.mkdir(exist_ok=True)
    results, table = [], []
    for name in args.models.split(","):
        trace = (TRACES if name in TRAINED else WORK) / f"{name}-heldout.jsonl.gz"
        if not args.from_traces:
            write_trace(trace, record(packed_model(name, args.study), name, args.prompt, args.decode))
        elif not trace.exists():
            continue
        steps = read_trace(trace)
        n_decode = sum(1 for s in steps if s.is_decode and s.layer == 0)
        rows = curve(steps)
        table.append((name, rows))
        text = "held-out text (this repo's streamer/ sources)" if name in TRAINED else "random token ids"
        config = f"P4-trained {name}, {n_decode} teacher-forced decode tokens of {text}, cache_sim one pool"
        for r in rows:
            for p in (*POLICIES, "optimal"):
                note = f"{r['slots']} slots; optimal {r['optimal']:.3f}"
                if p == DEFAULT_POLICY:
                    note += " (default policy)"
                results.append(row(config, f"decode hit rate {p} at {r['share']:.0%} of experts (ratio: / optimal)",
                                   r[p], r[p] / max(r["optimal"], 1e-9), note))  # fmt: skip
    print(f"{'model':<22} {'share':>5} {'slots':>6}" + "".join(f" {p:>7}" for p in (*POLICIES, "optimal"))
          + f" {DEFAULT_POLICY + '/opt':>8} {'lru/opt':>8}")  # fmt: skip
    for name, rows in table:
        for r in rows:
            cells = "".join(f" {r[p]:>7.3f}" for p in (*POLICIES, "optimal"))
            ratios = f" {r[DEFAULT_POLICY] / r['optimal']:>8.3f} {r['lru'] / r['optimal']:>8.3f}"
            print(f"{name:<22} {r['share']:>5.0%} {r['slots']:>6}{cells}{ratios}")
    if not args.no_record:
        append_results(results)


if __name__ == "__main__":
    main()
