"""Issue 15's table, rerun: decode tok/s and hits/misses vs ``--cache-experts`` on one checkpoint.

    python benchmarks/bench_cache_size.py                  # issue15 model, 8 / 64 / 256 / all, both layouts

The model of issue 15 (hidden 1024, 8 layers, 128 experts top-8, moe_intermediate 512, 4-bit; built
once in /tmp/streamer-bench-decode) in the published layout (bf16 scales and biases) and its float32
variant (the same checkpoint with bf16 widened exactly), direct I/O, 32 greedy tokens, f32 activations.
Each run is a fresh child process; sizes and layouts alternate so load drift spreads over all of them.
Goal: tok/s rising (or flat) with the cache size. Appends one row per (layout, size) to results.tsv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import _STREAMER, PROMPT  # noqa: E402
from common import (  # noqa: E402
    LAYOUTS,
    append_results,
    build_pair,
    drop_caches,
    issue15_preset,
    load_note,
    row,
    synthetic_maker,
)


def run(dst: Path, tokens: int, opts: dict) -> dict:
    argv = [sys.executable, "-c", _STREAMER, str(dst), json.dumps(PROMPT), str(tokens), json.dumps(opts)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,64,256,all", help="--cache-experts values; 'all' = every expert")
    ap.add_argument("--layouts", default="bf16,f32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamer-bench-decode"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    pairs = build_pair(args.work, "issue15", synthetic_maker(issue15_preset()))
    layouts = args.layouts.split(",")
    total = {}
    for layout in layouts:
        manifest = json.loads((pairs[layout][1] / "manifest.json").read_text())
        total[layout] = sum(layer["num_experts"] for layer in manifest["layers"])
    sizes = args.sizes.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    load_before = load_note()
    for r in range(args.rounds):
        order = [(layout, size) for size in sizes for layout in layouts]
        for layout, size in order if r % 2 == 0 else order[::-1]:
            n = total[layout] if size == "all" else int(size)
            drop_caches()
            opts = {"cache_experts": n, "io_mode": "direct", "threads": args.threads, "preload": False}
            res = run(pairs[layout][1], args.tokens, opts)
            results.setdefault((layout, size), []).append(res)
            print(f"  {layout} {size:>4}: {1 / res['decode_s_per_token']:.2f} tok/s, decode hits/misses "
                  f"{res['hits']}/{res['misses']}", flush=True)  # fmt: skip
    load = f"{load_before} before, {load_note()} after"
    rows = []
    desc = "issue15 (hidden 1024, 8L, 128 x top-8, inter 512, 4-bit)"
    for layout in layouts:
        base = None
        print(
            f"{layout} (scales/biases {LAYOUTS[layout]}), {args.tokens} tokens, best of {args.rounds}; {load}"
        )
        for size in sizes:
            best = min(results[(layout, size)], key=lambda x: x["decode_s_per_token"])
            tps = 1 / best["decode_s_per_token"]
            base = base or tps
            n = total[layout] if size == "all" else int(size)
            all_tps = ", ".join(f"{1 / x['decode_s_per_token']:.2f}" for x in results[(layout, size)])
            print(f"  --cache-experts {n:5d}: {tps:6.2f} tok/s (runs {all_tps}), hits/misses {best['hits']}/{best['misses']}"
                  f" ({best['bytes_per_token'] / 1e6:.1f} MB/tok); ÷ smallest cache {tps / base:.3f}")  # fmt: skip
            rows.append(row(
                f"{desc}, {layout} checkpoint (scales/biases {LAYOUTS[layout]}), --cache-experts {n}"
                f"{' (all)' if size == 'all' else ''}, direct I/O, {args.tokens} tokens",
                "decode tok/s vs cache size (ratio: ÷ smallest cache)", tps, tps / base,
                f"layout {layout}; f32 activations; decode hits/misses {best['hits']}/{best['misses']}; "
                f"{best['bytes_per_token'] / 1e6:.1f} MB/tok read; stall {best['stall_s_per_token'] * 1e3:.1f} ms/tok; "
                f"runs {all_tps} tok/s (best of {args.rounds}, sizes alternated); {load}"))  # fmt: skip
    if not args.no_record:
        append_results(rows)


if __name__ == "__main__":
    main()
