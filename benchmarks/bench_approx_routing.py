"""Approximate routing, side by side in one run: misses saved vs loss change vs KL.

    python benchmarks/bench_approx_routing.py                    # routing-study model and the demo
    python benchmarks/bench_approx_routing.py --models demo --decode 256

For each model and cache size (10 / 30 / 50 % of the experts, default policy), one held-out token stream
(this repository's streamer/ sources: neither trained model saw them; a 64-token prompt, then every
following token fed as a decode step) is run teacher-forced by fresh engines (cold caches):
  exact                 the reference run;
  --cache-bias B        cache-aware routing at several biases;
  --experts-per-token N at 30 % only, a few N below the model's top-k.
Each approximate run is compared with the exact one by ``tuning/divergence.compare``: decode-step misses
(and bytes read) saved, top-1 agreement, mean KL(exact || approx) and the change in held-out loss.
Misses are the runtime's own counters (``--prefetch parallel``). Appends to benchmarks/results.tsv.
Goal (issue 16): >= 40 % fewer misses at <= 1 % loss increase on the 256-expert model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_trained_routing import STUDY, held_out_ids, packed_model  # noqa: E402
from common import append_results, row  # noqa: E402

from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.tuning.divergence import compare, teacher_forced

SHARES = (0.1, 0.3, 0.5)
BIASES = (0.1, 0.25, 0.5, 1.0, 2.0)


def hit_rate(counters: dict) -> float:
    return counters["cache_hits"] / max(counters["cache_hits"] + counters["cache_misses"], 1)


def study(name: str, packed: Path, n_prompt: int, n_decode: int) -> tuple[list, list]:
    with load_engine(packed, RuntimeConfig(cache_experts=10**7)) as engine:
        args = engine.args
        ids = held_out_ids(engine.tokenizer, n_prompt + n_decode)
    total = args.num_hidden_layers * args.num_experts
    top_k = args.num_experts_per_tok
    ks = sorted({k for k in (top_k - 2, top_k // 2, max(1, top_k // 4)) if 1 <= k < top_k}, reverse=True)
    lines, results = [], []
    config = (
        f"approx-routing {name} ({args.num_experts} experts top-{top_k}, {args.num_hidden_layers}L), "
        f"{n_decode} teacher-forced decode tokens of held-out text, cold cache, default policy"
    )
    for share in SHARES:
        slots = max(top_k, round(share * total))

        def run(slots=slots, **flags):
            with load_engine(packed, RuntimeConfig(cache_experts=slots, **flags)) as engine:
                return teacher_forced(engine, ids, n_prompt)

        exact = run()
        modes = [(f"--cache-bias {b:g}", {"cache_bias": b}) for b in BIASES]
        if share == 0.3:
            modes += [(f"--experts-per-token {k}", {"experts_per_token": k}) for k in ks]
        lines.append((name, share, "exact", 0.0, hit_rate(exact.counters), 1.0, 0.0, 0.0))
        results.append(
            row(config, f"decode hit rate, exact routing, cache {share:.0%}", hit_rate(exact.counters), "",
                f"{slots} slots; misses {exact.counters['cache_misses']}, loss {compare(exact, exact)['loss_exact']:.4f}")
        )  # fmt: skip
        for label, flags in modes:
            d = compare(exact, run(**flags))
            saved = 1 - d["approx"]["cache_misses"] / max(d["exact"]["cache_misses"], 1)
            hr = hit_rate(d["approx"])
            lines.append((name, share, label, saved, hr, d["top1_agreement"], d["mean_kl"], d["loss_change"]))
            results.append(
                row(config, f"misses saved by {label} at cache {share:.0%} (ratio: loss change)", saved,
                    f"{d['loss_change']:+.4f}",
                    f"misses {d['exact']['cache_misses']} -> {d['approx']['cache_misses']}, bytes "
                    f"{d['exact']['bytes_read']} -> {d['approx']['bytes_read']}, hit rate "
                    f"{hit_rate(d['exact']):.3f} -> {hr:.3f}, top-1 agreement {d['top1_agreement']:.3f}, "
                    f"mean KL {d['mean_kl']:.5f} nats, loss {d['loss_exact']:.4f} -> {d['loss_approx']:.4f}; "
                    f"{slots} slots")
            )  # fmt: skip
    return lines, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=STUDY, help="the packed routing-study model")
    ap.add_argument("--models", default="routing-study,demo")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--no-record", action="store_true", help="do not append to results.tsv")
    args = ap.parse_args()
    lines, results = [], []
    for name in args.models.split(","):
        got = study(name, packed_model(name, args.study), args.prompt, args.decode)
        lines += got[0]
        results += got[1]
    head = f"{'model':<14} {'cache':>5} {'mode':<24} {'misses saved':>12} {'hit rate':>8} {'top-1':>6}"
    print(head + f" {'KL nats':>8} {'loss':>8}")
    for name, share, label, saved, hr, agree, kl, dloss in lines:
        print(f"{name:<14} {share:>5.0%} {label:<24} {100 * saved:>11.1f}% {hr:>8.3f} {agree:>6.3f} "
              f"{kl:>8.5f} {100 * dloss:>+7.2f}%")  # fmt: skip
    if not args.no_record:
        append_results(results)


if __name__ == "__main__":
    main()
