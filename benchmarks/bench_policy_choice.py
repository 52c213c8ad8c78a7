"""P4 by policy: which ``--cache-policy`` keeps the most hits on trained routing (the default is chosen here).

    python benchmarks/bench_policy_choice.py                 # the shipped demo, held-out text
    python benchmarks/bench_policy_choice.py --decode 1024   # longer trace

The demo model (trained on the Python standard library) reads text it never saw, this repository's own
sources, teacher-forced: a 64-token prompt, then each following token fed as a decode step. Its routing is
recorded once (with every expert cached; routing does not depend on the cache) and replayed through the
runtime's own slot bookkeeping (``tuning/cache_sim.simulate``, the same SlotBook and policy objects as
``ExpertCache``) at 10 / 30 / 50 % of the experts, for LRU, LFU with several aging half-lives, and
Belady's optimal. Ratios to optimal count decode steps. Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, row  # noqa: E402

from streamer.cli.options import resolve_model
from streamer.experts import policy as policy_module
from streamer.experts.expert_cache import plan_slots
from streamer.experts.runtime import block_shape_of
from streamer.generation.generate import prefill
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.storage.packed import read_manifest
from streamer.tuning.cache_sim import make_step, simulate, simulate_optimal

SHARES = (0.1, 0.3, 0.5)
HALF_LIVES = (1.0, 2.0, 4.0, 8.0, 16.0, 1e9)  # in pool capacities; 1e9 = no aging (plain LFU)
REPO = Path(__file__).resolve().parents[1]


def held_out_ids(tokenizer, n: int) -> list[int]:
    """This repository's own Python sources: code the demo never trained on."""
    files = sorted((REPO / "streamer").rglob("*.py"))
    ids = tokenizer.encode("\n".join(f.read_text() for f in files))
    assert len(ids) >= n, f"only {len(ids)} tokens of held-out text"
    return ids[:n]


def record(packed: Path, n_prompt: int, n_decode: int) -> list:
    steps = []
    with load_engine(packed, RuntimeConfig(cache_experts=10**6)) as engine:
        engine.runtime.on_route = lambda layer, ids: steps.append(make_step(layer, ids))
        ids = held_out_ids(engine.tokenizer, n_prompt + n_decode)
        cache = engine.model.make_cache()
        mx.eval(prefill(engine.model, ids[:n_prompt], cache))
        for tok in ids[n_prompt:]:
            mx.eval(engine.model(mx.array([[tok]]), cache=cache))
    return steps


def pools(packed: Path, share: float, top_k: int):
    layers = read_manifest(packed).layers
    shapes = {e.layer: block_shape_of(e) for e in layers}
    counts = {e.layer: e.num_experts for e in layers}
    total = sum(s.nbytes * counts[l] for l, s in shapes.items())
    return plan_slots(shapes, counts, int(share * total), top_k), shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=768)
    args = ap.parse_args()
    packed = resolve_model(None)
    steps = record(packed, args.prompt, args.decode)
    top_k = max(len(s.experts) for s in steps[-8:])
    rows, table = [], []
    default_half_life = policy_module.LFU_HALF_LIFE_CAPACITIES
    for share in SHARES:
        plan, shapes = pools(packed, share, top_k)
        opt = simulate_optimal(steps, plan, shapes).decode_hit_rate
        rates = {"lru": simulate(steps, plan, shapes, policy="lru").decode_hit_rate}
        for h in HALF_LIVES:
            policy_module.LFU_HALF_LIFE_CAPACITIES = h  # read when each pool's policy is made
            rates[f"lfu-h{h:g}"] = simulate(steps, plan, shapes, policy="lfu").decode_hit_rate
        policy_module.LFU_HALF_LIFE_CAPACITIES = default_half_life
        table.append((share, opt, rates))
        for name, rate in rates.items():
            rows.append(
                row(
                    "P4-policy demo (trained) held-out, cache_sim on SlotBook",
                    f"decode hit rate {name} at {share:.0%} of experts (ratio: / optimal {opt:.3f})",
                    rate,
                    rate / opt,
                    f"{args.decode} teacher-forced decode tokens of this repo's sources (not in the demo's "
                    "training text)",
                )
            )
    for share, opt, rates in table:
        cells = "  ".join(f"{n} {r:.3f} ({r / opt:.2f})" for n, r in rates.items())
        print(f"{share:.0%}: optimal {opt:.3f}  {cells}")
    append_results(rows)


if __name__ == "__main__":
    main()
