"""Decode speed side by side in one run: streamer vs mlx-lm, and streaming efficiency vs the raw disk.

    python benchmarks/bench_decode.py                       # full-width, 2 layers, small vocab (~9 GB x 2)
    python benchmarks/bench_decode.py --preset like-397b    # a small preset (overhead-bound)

P1 (all experts cached): streamer decode tok/s ÷ mlx-lm decode tok/s on the same float32 checkpoint
   (float32 because bf16 matmuls on MLX's CPU backend are ~8x slower and drift).
P2 (cold cache, direct I/O): max(compute-only s/token, missed bytes/token ÷ raw O_DIRECT random-read
   GB/s of the same block size) ÷ actual s/token. 1.0 = I/O fully hidden behind compute (or vice versa).

Every measurement runs in its own child process (clean memory, its own page-cache state). Appends to
benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, drop_caches, row  # noqa: E402

PROMPT = [11, 400, 23, 7, 150, 300, 42, 5]

_MLX_LM = """
import json, sys, time
import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step
model, _ = mlx_lm.load(sys.argv[1])
prompt, n = json.loads(sys.argv[2]), int(sys.argv[3])
times = []
for token, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)):
    times.append(time.perf_counter())
print(json.dumps({"decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1)}))
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
cache = engine.model.make_cache()
logits = engine.model(mx.array([prompt]), cache=cache)[0, -1]
mx.eval(logits)
before = engine.stats()
times = [time.perf_counter()]
token = int(mx.argmax(logits).item())
for _ in range(n - 1):
    logits = engine.model(mx.array([[token]]), cache=cache)[0, -1]
    token = int(mx.argmax(logits).item())
    times.append(time.perf_counter())
after = engine.stats()
steps = len(times) - 1
print(json.dumps({
    "decode_s_per_token": (times[-1] - times[0]) / steps,
    "bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / steps,
    "misses_per_token": (after["cache_misses"] - before["cache_misses"]) / steps,
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


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_model(args) -> tuple[Path, Path]:
    src = args.work / f"{args.preset}-{args.layers}L-v{args.vocab}-src"
    dst = args.work / f"{args.preset}-{args.layers}L-v{args.vocab}-packed"
    if not src.exists():
        cmd = ["synthetic", args.preset, str(src), "--dtype", "float32", "--layers", str(args.layers)]
        if args.preset == "full-width":
            cmd += ["--vocab-size", str(args.vocab)]
        subprocess.run([sys.executable, "-c", "from streamer.cli.main import main; main()", *cmd], check=True)
    if not (dst / "manifest.json").exists():
        subprocess.run([sys.executable, "-c", "from streamer.cli.main import main; main()", "repack", str(src), str(dst)],
                       check=True)  # fmt: skip
    return src, dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full-width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--vocab", type=int, default=576, help="full-width vocabulary (small: measure the layers)"
    )
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument(
        "--cold-cache-share", type=float, default=0.1, help="P2 cache size as a share of all experts"
    )
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamer-bench-decode"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src, dst = ensure_model(args)
    config = f"{args.preset} {args.layers}L vocab {args.vocab} f32, {args.tokens} tokens"
    prompt, n = json.dumps(PROMPT), str(args.tokens)
    expert_bytes = json.loads((dst / "manifest.json").read_text())
    total_expert_bytes = sum(layer["num_experts"] * layer["block_bytes"] for layer in expert_bytes["layers"])

    # P1: all experts cached (preloaded) vs mlx-lm resident, alternated twice to even out noise.
    warm_opts = {"cache_bytes": 2 * total_expert_bytes, "preload": True, "threads": args.threads}
    ours, theirs = [], []
    for _ in range(2):
        theirs.append(child(_MLX_LM, str(src), prompt, n)["decode_s_per_token"])
        ours.append(child(_STREAMER, str(dst), prompt, n, json.dumps(warm_opts))["decode_s_per_token"])
    ours_s, theirs_s = min(ours), min(theirs)
    p1 = theirs_s / ours_s
    print(f"P1 all cached: streamer {1 / ours_s:.2f} tok/s, mlx-lm {1 / theirs_s:.2f} tok/s, ratio {p1:.3f}")

    # P2: cold cache, direct I/O, against raw O_DIRECT random reads of the same blocks.
    cold_opts = {
        "cache_bytes": int(args.cold_cache_share * total_expert_bytes),
        "io_mode": "direct",
        "prefetch": "parallel",
        "threads": args.threads,
        "preload": False,
    }
    # Compute-only and cold runs alternate too: the machine's load drifts between minutes.
    warm_runs, cold_runs, raws = [], [], []
    dropped = False
    for _ in range(2):
        warm_runs.append(child(_STREAMER, str(dst), prompt, n, json.dumps(warm_opts))["decode_s_per_token"])
        dropped = drop_caches()
        raws.append(child(_RAW, str(dst), "400", str(args.threads))["gb_per_s"])
        drop_caches()
        cold_runs.append(child(_STREAMER, str(dst), prompt, n, json.dumps(cold_opts)))
    compute_s = min(warm_runs)
    raw = {"gb_per_s": max(raws)}
    cold = min(cold_runs, key=lambda r: r["decode_s_per_token"])
    io_s = cold["bytes_per_token"] / (raw["gb_per_s"] * 1e9)
    bound = max(compute_s, io_s)
    p2 = bound / cold["decode_s_per_token"]
    print(
        f"P2 cold cache ({args.cold_cache_share:.0%} of experts, direct I/O): {cold['decode_s_per_token']:.3f} s/token, "
        f"compute-only {compute_s:.3f} s, I/O-only {io_s:.3f} s ({cold['bytes_per_token'] / 1e6:.1f} MB/token at raw "
        f"{raw['gb_per_s']:.2f} GB/s), stalled {cold['stall_s_per_token']:.3f} s/token; efficiency {p2:.3f}"
    )
    if not args.no_record:
        note_cache = "page cache dropped" if dropped else "page cache NOT dropped (not root)"
        append_results(
            [
                row(config, "P1 decode tok/s streamer (all cached) vs mlx-lm", 1 / ours_s, p1,
                    f"mlx-lm {1 / theirs_s:.3f} tok/s; best of 2 alternated runs"),
                row(config, "P2 streaming efficiency (cold, direct I/O)", 1 / cold["decode_s_per_token"], p2,
                    f"cache {args.cold_cache_share:.0%}; compute {compute_s:.3f} s/tok; io {io_s:.3f} s/tok; "
                    f"raw {raw['gb_per_s']:.2f} GB/s; {cold['bytes_per_token'] / 1e6:.1f} MB/tok; {note_cache}"),
            ]
        )  # fmt: skip


if __name__ == "__main__":
    main()
