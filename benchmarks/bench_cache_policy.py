"""P4, cache policy: LRU vs Belady's optimal on recorded routing, and what next-layer prediction adds.

    python benchmarks/bench_cache_policy.py                       # like-397b, like-35b (random), the demo
    python benchmarks/bench_cache_policy.py --models full-width   # 512 x top-10, 4 layers (~15 min)

For each model a routing trace is recorded by running the real engine (teacher-forced: a prompt prefill,
then the following tokens fed one at a time as decode steps, so a weak model's greedy loops do not inflate
reuse). Input: random token ids for the random-weight presets; Python source (the stdlib's own files,
what the demo was trained on) for the demo. The trace is replayed through a global cache of N expert
slots (one pool shared by all layers, as the runtime's pool for one block shape) at several capacities:
  LRU          the --cache-policy lru eviction, step for step (streamer.tuning.cache_sim.simulate_lru; the
               default policy is lfu since session 2: bench_trained_routing.py compares them all);
  LRU-1pass    the older one-pass order (hits and misses interleaved), for comparison;
  optimal      Belady's MIN: evict the expert needed farthest in the future.
Hit rates count decode steps; the prefill warms the cache first. (Issue 16 measured the default policy
against optimal instead: bench_trained_routing.py.)

Prediction: the same tokens run twice at one capacity (cold cache, direct I/O) with --prefetch parallel
and --prefetch predict; compared over the same decode steps: prediction accuracy, misses whose read started
a layer early, hit rate, bytes and I/O stall per token. The parallel run's hit count is also checked
against the simulator's. Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, drop_caches, row  # noqa: E402

from streamer.experts.expert_cache import plan_slots
from streamer.experts.runtime import block_shape_of
from streamer.generation.generate import prefill
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.tuning.cache_sim import make_step, simulate_lfu, simulate_lru, simulate_optimal

SHARES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
WORK = Path("/tmp/streamer-bench-policy")
FULL_WIDTH = Path("/tmp/streamer-bench-decode/full-width-4L-v576-packed")
# model -> (prompt tokens, decode tokens, decode tokens compared with/without prediction, cache share)
PLAN = {
    "like-397b": (64, 512, 256, 0.3),
    "like-35b": (64, 512, 256, 0.3),
    "demo": (64, 512, 256, 0.3),
    "full-width": (16, 384, 96, 0.3),
}


def packed_model(name: str) -> Path:
    if name == "demo":
        from streamer.cli.options import resolve_model

        return resolve_model(None)
    if name == "full-width":
        return FULL_WIDTH
    from streamer.storage.repack import run_repack
    from streamer.storage.repack_plan import make_plan
    from streamer.synthetic.presets import get_preset
    from streamer.synthetic.writer import generate

    dst = WORK / f"{name}-8L-packed"
    if not (dst / "manifest.json").exists():
        src = WORK / f"{name}-8L-src"
        if not src.exists():
            generate(src, get_preset(name, num_layers=8), dtype="float32", seed=0)
        run_repack(make_plan(src, dst))
    return dst


def input_ids(engine, name: str, n: int) -> list[int]:
    """Python source for the demo (it was trained on it), random ids for random-weight models."""
    if name != "demo":
        return random.Random(0).choices(range(engine.args.vocab_size), k=n)
    import collections
    import json as json_module

    text = "".join(Path(inspect.getsourcefile(m)).read_text() for m in (collections, json_module.decoder))
    ids = engine.tokenizer.encode(text)
    assert len(ids) >= n, f"only {len(ids)} tokens of source text"
    return ids[:n]


def run(
    packed: Path, name: str, share: float, prefetch: str, n_prompt: int, n_decode: int, mark: int
) -> dict:
    """One teacher-forced run: routing steps, and runtime counters over decode steps [0, mark)."""
    manifest = json.loads((packed / "manifest.json").read_text())
    budget = pools(packed, share)[2]
    engine = load_engine(packed, RuntimeConfig(cache_bytes=budget, io_mode="direct", prefetch=prefetch))
    steps = []
    engine.runtime.on_route = lambda layer, ids: steps.append(make_step(layer, ids))
    ids = input_ids(engine, name, n_prompt + n_decode)
    cache = engine.model.make_cache()
    mx.eval(prefill(engine.model, ids[:n_prompt], cache))
    start, before = time.perf_counter(), engine.stats()
    marked = None
    for i, tok in enumerate(ids[n_prompt:]):
        if i == mark:
            marked = (time.perf_counter() - start, engine.stats())
        mx.eval(engine.model(mx.array([[tok]]), cache=cache))
    marked = marked or (time.perf_counter() - start, engine.stats())
    slots = {str(k): v for k, v in engine.runtime.cache.slots_per_shape.items()}
    engine.close()
    delta = {k: marked[1][k] - before[k] for k in before if isinstance(before[k], (int, float))}
    return {"steps": steps, "window": {**delta, "seconds": marked[0], "tokens": min(mark, n_decode)},
            "slots": list(slots.values()), "manifest": manifest}  # fmt: skip


def pools(packed: Path, share: float) -> tuple[dict, dict, int]:
    """(slots per pool, pool of each layer, budget bytes) for ``share`` of all experts, as the runtime plans."""
    from streamer.storage.packed import read_manifest

    layers = read_manifest(packed).layers
    shapes = {e.layer: block_shape_of(e) for e in layers}
    counts = {e.layer: e.num_experts for e in layers}
    config = json.loads((packed / "config.json").read_text())
    top_k = config.get("text_config", config)["num_experts_per_tok"]
    total_bytes = sum(s.nbytes * counts[l] for l, s in shapes.items())
    budget = int(share * total_bytes)
    return plan_slots(shapes, counts, budget, top_k), shapes, budget


def curve(steps, packed: Path) -> list[dict]:
    out = []
    for share in SHARES:
        plan, shapes, _ = pools(packed, share)
        lru = simulate_lru(steps, plan, shapes).decode_hit_rate
        first = simulate_lru(
            steps, plan, shapes, lookup_first=False
        ).decode_hit_rate  # the older one-pass order
        opt = simulate_optimal(steps, plan, shapes).decode_hit_rate
        lfu = simulate_lfu(steps, plan, shapes).decode_hit_rate
        out.append(
            {
                "share": share,
                "slots": sum(plan.values()),
                "lru": lru,
                "lru_first": first,
                "lfu": lfu,
                "optimal": opt,
            }
        )
    return out


def sim_hits_in_window(steps, packed: Path, share: float, n_prompt_steps: int, mark_steps: int) -> int:
    """Simulated decode hits over the first ``mark_steps`` decode steps (for the runtime cross-check)."""
    plan, shapes, _ = pools(packed, share)
    return simulate_lru(steps[: n_prompt_steps + mark_steps], plan, shapes).decode_hits


def per_token(w: dict) -> dict:
    n = max(w["tokens"], 1)
    looked = w["cache_hits"] + w["cache_misses"]
    return {"hit_rate": w["cache_hits"] / max(looked, 1), "mb": w["bytes_read"] / n / 1e6,
            "stall_s": w["stall_s"] / n, "s": w["seconds"] / n}  # fmt: skip


def study(name: str) -> tuple[list[list[str]], list[dict]]:
    packed = packed_model(name)
    n_prompt, n_decode, mark, share = PLAN[name]
    drop_caches()
    par = run(packed, name, share, "parallel", n_prompt, n_decode, mark)
    drop_caches()
    pred = run(packed, name, share, "predict", n_prompt, mark, mark)
    steps = par["steps"]
    n_layers = len(par["manifest"]["layers"])
    rows = curve(steps, packed)
    print(f"\n{name}: {n_prompt} prompt + {n_decode} decode tokens, {n_layers} layers")
    per_token_set = n_layers * max(len(st.experts) for st in steps if st.is_decode)
    print(
        f"{'share':>6} {'slots':>6} {'x set':>6} {'LRU':>7} {'LRU-1st':>8} {'LFU':>7} {'optimal':>8} {'LRU/opt':>8}"
    )
    for r in rows:
        print(f"{r['share']:>6.0%} {r['slots']:>6} {r['slots'] / per_token_set:>6.1f} {r['lru']:>7.3f} "
              f"{r['lru_first']:>8.3f} {r['lfu']:>7.3f} {r['optimal']:>8.3f} {r['lru'] / max(r['optimal'], 1e-9):>8.3f}")  # fmt: skip
    sim = sim_hits_in_window(steps, packed, share, n_layers, mark * n_layers)
    a, b = per_token(par["window"]), per_token(pred["window"])
    w = pred["window"]
    acc = w["predicted_right"] / max(w["predicted"], 1)
    early = w["prefetch_used"] / max(w["cache_misses"], 1)
    print(f"runtime at {share:.0%} ({par['slots']} slots), first {mark} decode tokens: parallel hits "
          f"{par['window']['cache_hits']} (simulator {sim}); prediction accuracy {acc:.3f}, misses read early "
          f"{early:.3f}; hit rate {a['hit_rate']:.3f} -> {b['hit_rate']:.3f}, MB/token {a['mb']:.2f} -> {b['mb']:.2f}, "
          f"stall s/token {a['stall_s']:.4f} -> {b['stall_s']:.4f}, s/token {a['s']:.4f} -> {b['s']:.4f}")  # fmt: skip
    label = f"{name} ({packed.name})" if name == "demo" else name  # the demo changes as it is retrained
    config = f"{label} {n_layers}L, {n_prompt}+{n_decode} tokens teacher-forced, global pool"
    at = {r["share"]: r for r in rows}
    head = at[0.3]
    curve_note = "; ".join(
        f"{r['share']:.0%} ({r['slots'] / per_token_set:.1f}x the per-token set): LRU {r['lru']:.3f} "
        f"LRU-first {r['lru_first']:.3f} LFU {r['lfu']:.3f} opt {r['optimal']:.3f}"
        for r in rows
    )
    return rows, [
        row(config, "P4 LRU / optimal decode hit rate at 30% of experts", head["lru"],
            head["lru"] / max(head["optimal"], 1e-9), f"curve (hit rates): {curve_note}"),
        row(config, "P4 next-layer prediction accuracy (--prefetch predict)", acc, early,
            f"ratio = misses whose read started a layer early; cache {share:.0%}, first {mark} decode tokens, "
            f"parallel -> predict: hit rate {a['hit_rate']:.3f} -> {b['hit_rate']:.3f}, MB/tok {a['mb']:.2f} -> "
            f"{b['mb']:.2f}, stall s/tok {a['stall_s']:.4f} -> {b['stall_s']:.4f}, s/tok {a['s']:.4f} -> "
            f"{b['s']:.4f}; runtime hits {par['window']['cache_hits']}, simulator {sim}; direct I/O, cold; "
            "2 cores shared with a training job"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="like-397b,like-35b,demo", help=f"comma-separated of {', '.join(PLAN)}"
    )
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        results += study(name)[1]
    if not args.no_record:
        append_results(results)


if __name__ == "__main__":
    main()
