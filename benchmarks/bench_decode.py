"""Decode speed side by side in one run: streamer vs mlx-lm, and streaming efficiency vs the raw disk.

    python benchmarks/bench_decode.py --models tiny,like-35b,demo,issue15   # P1 on the small models (~3 min)
    python benchmarks/bench_decode.py --models full-width --layers 1 --tokens 8   # P1 at real widths
    python benchmarks/bench_decode.py --models full-width --p2              # P1 and P2 (cold cache)

Every model runs in both layouts: "bf16", as published (bfloat16 scales, biases and unquantized tensors,
as every mlx-community 4-bit upload; the demo is the shipped trained checkpoint, streamer/assets/demo) and
"f32", the same checkpoint with every bfloat16 tensor widened to float32 (exact; common.widen_checkpoint).

P1 (all experts cached, preloaded): streamer decode tok/s (stream_generate: the loop `generate` runs) on each layout (float32 activations, its CPU
   default) ÷ mlx-lm on the f32 variant (float32 activations): the reference, since bf16 matmuls on MLX's
   CPU backend are several times slower. mlx-lm on the bf16 layout (bfloat16 activations: what users run)
   is measured in the same alternation and recorded too. Greedy tokens are compared with the reference's.
P2 (cold cache, direct I/O): max(compute-only s/token, missed bytes/token ÷ raw O_DIRECT random-read
   GB/s of the same block size) ÷ actual s/token. 1.0 = I/O fully hidden behind compute (or vice versa).

Every measurement runs in its own child process (clean memory, its own page-cache state); the notes carry
the machine's load (load average, CPU pressure) before and after. Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
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

from streamer.synthetic.presets import _text_config, get_preset  # noqa: E402

PROMPT = [11, 400, 23, 7, 150, 300, 42, 5]

_MLX_LM = """
import json, sys, time
import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step
model, _ = mlx_lm.load(sys.argv[1])
prompt, n = json.loads(sys.argv[2]), int(sys.argv[3])
times, tokens = [], []
for token, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)):
    times.append(time.perf_counter())
    tokens.append(int(token))
    dtype = str(_.dtype)
print(json.dumps({"decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1), "activation": dtype, "tokens": tokens}))
"""

_STREAMER = """
import json, sys, time
import mlx.core as mx
from streamer.settings import RuntimeConfig
from streamer.loader import load_engine
path, prompt, n, opts = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
preload = opts.pop("preload")
engine = load_engine(path, RuntimeConfig(**opts))
if preload:
    engine.runtime.preload()
# What `streamer generate` runs: stream_generate on the scheduler (greedy, EOS ignored), timed per token.
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
class _NoEos:
    eos_token_ids = frozenset()
    def detokenizer(self):
        return engine.tokenizer.detokenizer()
stream = stream_generate(engine.model, _NoEos(), prompt, make_sampler(SamplingParams()), n)
first = next(stream)  # the prefill's token
before = engine.stats()
times = [time.perf_counter()]
tokens = [first.token]
for r in stream:
    tokens.append(r.token)
    times.append(time.perf_counter())
after = engine.stats()
steps = len(times) - 1
print(json.dumps({
    "decode_s_per_token": (times[-1] - times[0]) / steps,
    "bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / steps,
    "misses_per_token": (after["cache_misses"] - before["cache_misses"]) / steps,
    "hits_per_token": (after["cache_hits"] - before["cache_hits"]) / steps,
    "hits": after["cache_hits"] - before["cache_hits"],
    "misses": after["cache_misses"] - before["cache_misses"],
    "activation": str(engine.model.dtype),
    "tokens": tokens,
    "stall_s_per_token": (after["stall_s"] - before["stall_s"]) / steps,
    "cache_bytes": after["cache_bytes"],
}))
"""

# Random O_DIRECT reads of whole expert blocks with the same thread count as streamer uses.
_RAW = """
import json, mmap, os, random, sys, time
from concurrent.futures import ThreadPoolExecutor
from streamer.storage.packed import open_packed
packed = open_packed(sys.argv[1]); reads, threads = int(sys.argv[2]), int(sys.argv[3])
layers = packed.manifest.layers
rng = random.Random(0)
jobs = [(l.layer, rng.randrange(l.num_experts)) for l in rng.choices(layers, k=reads)]
flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
fds = {l.layer: os.open(packed.path / l.file, flags) for l in layers}
local = __import__("threading").local()
def read(job):
    layer, expert = job
    entry = layers[layer]
    buf = getattr(local, "buf", None)
    if buf is None:
        buf = local.buf = mmap.mmap(-1, entry.block_bytes)
    return os.preadv(fds[layer], [memoryview(buf)[: entry.block_bytes]], entry.block_offset(expert))
start = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    total = sum(pool.map(read, jobs))
print(json.dumps({"gb_per_s": total / (time.perf_counter() - start) / 1e9, "block_bytes": layers[0].block_bytes}))
"""


def _same_prefix(got: list[int], want: list[int]) -> int:
    """How many leading tokens agree (after the first difference, greedy paths part for good)."""
    n = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        n += 1
    return n


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def models(args) -> dict:
    """name -> (make_bf16, description) for ``build_pair``: every model in the published layout."""

    def demo(dst: Path) -> Path:
        from streamer.synthetic.demo import demo_checkpoint, has_trained_demo

        if not has_trained_demo():
            sys.exit("the trained demo checkpoint is missing from streamer/assets/demo")
        return demo_checkpoint(build=False)

    # mlx-lm's qwen3_5 needs a full-attention layer (it indexes the cache of the first one), so a short
    # full-width stack puts one at its end: full_attention_interval = the layer count (at most 4, as real).
    interval = min(4, args.layers)
    fw_preset = get_preset("full-width", args.layers, args.vocab)
    fw_preset = dataclasses.replace(
        fw_preset, text_config=_text_config(**{**fw_preset.text_config, "full_attention_interval": interval})
    )
    fw = f"full-width {args.layers}L (full attention every {interval}) vocab {args.vocab}"
    return {
        "tiny": (synthetic_maker("tiny"), "tiny"),
        "like-35b": (synthetic_maker("like-35b"), "like-35b"),
        "demo": (demo, "demo (shipped trained checkpoint, streamer/assets/demo)"),
        "issue15": (synthetic_maker(issue15_preset()), "issue15 (hidden 1024, 8L, 128 x top-8, inter 512)"),
        "full-width": (synthetic_maker(fw_preset), fw),
    }


def p1(name: str, desc: str, pairs: dict, args, tokens: int, rounds: int) -> list[list[str]]:
    """P1: streamer (every expert cached, preloaded) on each layout vs mlx-lm on each layout, all four
    alternated ``rounds`` times in one run; best of the rounds per side."""
    prompt, n = json.dumps(PROMPT), str(tokens)
    runs: dict[str, list[dict]] = {}
    load_before = load_note()
    for r in range(rounds):
        order = [("mlx-lm", "f32"), ("streamer", "f32"), ("mlx-lm", "bf16"), ("streamer", "bf16")]
        for side, layout in order if r % 2 == 0 else order[::-1]:
            src, dst = pairs[layout]
            if side == "mlx-lm":
                res = child(_MLX_LM, str(src), prompt, n)
            else:
                manifest = json.loads((dst / "manifest.json").read_text())
                total = sum(layer["num_experts"] * layer["block_bytes"] for layer in manifest["layers"])
                opts = {"cache_bytes": 4 * total, "preload": True, "threads": args.threads}
                res = child(_STREAMER, str(dst), prompt, n, json.dumps(opts))
            runs.setdefault(f"{side} {layout}", []).append(res)
    load = f"{load_before} before, {load_note()} after"
    best = {k: min(v, key=lambda r: r["decode_s_per_token"]) for k, v in runs.items()}
    tps = {k: 1 / v["decode_s_per_token"] for k, v in best.items()}
    ref = tps["mlx-lm f32"]
    # Greedy tokens agree with the reference's (streamer runs f32 activations on both layouts and bf16 -> f32
    # is exact, so both should match mlx-lm on the f32 variant; a fast wrong answer would not count).
    want = best["mlx-lm f32"]["tokens"]
    agree = {layout: _same_prefix(best[f"streamer {layout}"]["tokens"], want) for layout in ("bf16", "f32")}
    acts = {k: v["activation"] for k, v in best.items()}
    print(f"P1 {desc} ({tokens} tokens, best of {rounds}; {load})")
    print(f"  streamer's greedy tokens equal to mlx-lm f32's: {agree}")
    for k in runs:
        extra = f", misses/token {best[k]['misses_per_token']:.2f}" if k.startswith("streamer") else ""
        print(
            f"  {k:14s} {tps[k]:8.2f} tok/s  ({acts[k]} activations{extra})  ÷ mlx-lm f32: {tps[k] / ref:.3f}"
        )
    rows = []
    for layout in ("bf16", "f32"):
        ours = tps[f"streamer {layout}"]
        same = tps[f"mlx-lm {layout}"]
        rows.append(row(
            f"{desc}, {layout} checkpoint (scales/biases {LAYOUTS[layout]}), {tokens} tokens",
            "P1 decode tok/s streamer (all cached) vs mlx-lm f32",
            ours, ours / ref,
            f"layout {layout}; streamer on the {layout} packed copy, {acts[f'streamer {layout}']} activations, "
            f"every expert preloaded ({best[f'streamer {layout}']['misses_per_token']:.2f} misses/tok); "
            f"ratio vs mlx-lm {ref:.3f} tok/s on the f32 variant ({acts['mlx-lm f32']} activations, the "
            f"reference); vs mlx-lm on the same {layout} checkpoint ({same:.3f} tok/s, {acts[f'mlx-lm {layout}']} "
            f"activations): {ours / same:.3f}; greedy tokens equal to the reference's: {agree[layout]}/{tokens}; best of {rounds} alternated; {load}"))  # fmt: skip
    rows.append(row(
        f"{desc}, bf16 checkpoint (scales/biases bfloat16), {tokens} tokens",
        "P1 decode tok/s mlx-lm on bf16 layout vs mlx-lm f32",
        tps["mlx-lm bf16"], tps["mlx-lm bf16"] / ref,
        f"layout bf16; what users run: mlx-lm on the published checkpoint ({acts['mlx-lm bf16']} activations) "
        f"÷ mlx-lm on the f32 variant ({ref:.3f} tok/s, {acts['mlx-lm f32']}); best of {rounds} alternated; {load}"))  # fmt: skip
    return rows


def p2(desc: str, layout: str, src: Path, dst: Path, args) -> list[list[str]]:
    """P2: cold cache, direct I/O, against raw O_DIRECT random reads of the same blocks."""
    prompt, n = json.dumps(PROMPT), str(args.tokens)
    manifest = json.loads((dst / "manifest.json").read_text())
    total_expert_bytes = sum(layer["num_experts"] * layer["block_bytes"] for layer in manifest["layers"])
    warm_opts = {"cache_bytes": 4 * total_expert_bytes, "preload": True, "threads": args.threads}
    cold_opts = {
        "cache_bytes": int(args.cold_cache_share * total_expert_bytes),
        "io_mode": "direct",
        "prefetch": "parallel",
        "threads": args.threads,
        "preload": False,
    }
    # Compute-only and cold runs alternate: the machine's load drifts between minutes.
    warm_runs, cold_runs, raws = [], [], []
    dropped = False
    load_before = load_note()
    for _ in range(2):
        warm_runs.append(child(_STREAMER, str(dst), prompt, n, json.dumps(warm_opts))["decode_s_per_token"])
        dropped = drop_caches()
        raws.append(child(_RAW, str(dst), "400", str(args.threads))["gb_per_s"])
        drop_caches()
        cold_runs.append(child(_STREAMER, str(dst), prompt, n, json.dumps(cold_opts)))
    compute_s, gbps = min(warm_runs), max(raws)
    cold = min(cold_runs, key=lambda r: r["decode_s_per_token"])
    io_s = cold["bytes_per_token"] / (gbps * 1e9)
    eff = max(compute_s, io_s) / cold["decode_s_per_token"]
    load = f"{load_before} before, {load_note()} after"
    print(
        f"P2 {desc} {layout}: cold ({args.cold_cache_share:.0%} of experts, direct I/O) "
        f"{cold['decode_s_per_token']:.3f} s/token, compute-only {compute_s:.3f} s, I/O-only {io_s:.3f} s "
        f"({cold['bytes_per_token'] / 1e6:.1f} MB/token at raw {gbps:.2f} GB/s); efficiency {eff:.3f}; {load}"
    )
    note_cache = "page cache dropped" if dropped else "page cache NOT dropped (not root)"
    return [row(f"{desc}, {layout} checkpoint (scales/biases {LAYOUTS[layout]}), {args.tokens} tokens",
                "P2 streaming efficiency (cold, direct I/O)", 1 / cold["decode_s_per_token"], eff,
                f"layout {layout}; cache {args.cold_cache_share:.0%}; compute {compute_s:.3f} s/tok; io {io_s:.3f} "
                f"s/tok; raw {gbps:.2f} GB/s; {cold['bytes_per_token'] / 1e6:.1f} MB/tok; {note_cache}; {load}")]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="full-width", help="comma-separated: tiny, like-35b, demo, issue15, full-width"
    )
    ap.add_argument("--layers", type=int, default=2, help="full-width layer count")
    ap.add_argument(
        "--vocab", type=int, default=576, help="full-width vocabulary (small: measure the layers)"
    )
    ap.add_argument("--tokens", type=int, default=12, help="decode tokens on full-width (P1 and P2)")
    ap.add_argument("--small-tokens", type=int, default=48, help="decode tokens on the small models (P1)")
    ap.add_argument("--rounds", type=int, default=2, help="P1 alternations")
    ap.add_argument("--p2", action="store_true", help="also P2 (cold cache) on every model and layout")
    ap.add_argument(
        "--cold-cache-share", type=float, default=0.1, help="P2 cache size as a share of all experts"
    )
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamer-bench-decode"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    known = models(args)
    for name in args.models.split(","):
        make, desc = known[name]
        tag = f"{name}-{args.layers}L-v{args.vocab}-fa{min(4, args.layers)}" if name == "full-width" else name
        pairs = build_pair(args.work, tag, make)
        big = name == "full-width"
        rows = p1(name, desc, pairs, args, args.tokens if big else args.small_tokens, args.rounds)
        if args.p2:
            for layout, (src, dst) in pairs.items():
                rows += p2(desc, layout, src, dst, args)
        if not args.no_record:
            append_results(rows)


if __name__ == "__main__":
    main()
