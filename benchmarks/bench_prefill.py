"""P6, prefill: expert bytes read per chunk vs the union of routed experts, and prefill tok/s vs mlx-lm.

    python benchmarks/bench_prefill.py                     # like-397b 8L (small) + full-width 4L bytes
    python benchmarks/bench_prefill.py --skip-full-width   # minutes less

Bytes: the prompt is prefilled chunk by chunk on a cold cache (direct I/O); at every layer call the
routing hook records the union of the chunk's experts and the runtime's miss counter, so each (chunk,
layer) gets read-blocks ÷ distinct-experts. The runtime should read each distinct expert of a chunk at
most once per layer (goal: bytes read ÷ union bytes <= 1.0), also when the union is larger than the
cache (it then runs the chunk in batches that fit the free slots).

Speed: prompt tok/s of streamer (every expert cached and preloaded; and cold, streaming with a small
cache) ÷ mlx-lm on the same float32 checkpoint, same chunk size, each in its own child process,
alternated twice (best of 2). Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, drop_caches, row  # noqa: E402

WORK = Path("/tmp/streamer-bench-policy")
FULL_WIDTH = Path("/tmp/streamer-bench-decode/full-width-4L-v576-packed")

# Per (chunk, layer): distinct experts routed and blocks read. Prints one JSON line.
_BYTES = """
import json, sys
import mlx.core as mx
import numpy as np
from streamer.settings import RuntimeConfig
from streamer.loader import load_engine
path, ids, chunk, share = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
m = json.loads(open(path + "/manifest.json").read())
block = {l["layer"]: l["block_bytes"] for l in m["layers"]}
total = sum(l["num_experts"] * l["block_bytes"] for l in m["layers"])
engine = load_engine(path, RuntimeConfig(cache_bytes=int(share * total), io_mode="direct"))
rt = engine.runtime
calls = []  # [chunk, layer, distinct, misses before, bytes before]
def hook(layer, ids_):
    s = rt.snapshot_stats()
    calls.append([len(chunks), layer, len(np.unique(ids_)), s["cache_misses"], s["bytes_read"]])
rt.on_route = hook
cache, chunks = engine.model.make_cache(), []
for start in range(0, len(ids), chunk):
    chunks.append(start)
    out = engine.model(mx.array([ids[start:start + chunk]]), cache=cache, last_only=True)
    mx.eval(out, [c.state for c in cache])
end = rt.snapshot_stats()
calls.append([None, None, 0, end["cache_misses"], end["bytes_read"]])
rows = [{"chunk": a[0] - 1, "layer": a[1], "distinct": a[2], "reads": b[3] - a[3], "bytes": b[4] - a[4],
         "union_bytes": a[2] * block[a[1]]} for a, b in zip(calls, calls[1:])]
print(json.dumps({"rows": rows, "slots": sum(rt.cache.slots_per_shape.values())}))
"""

_STREAMER_TPS = """
import json, sys, time
import mlx.core as mx
from streamer.settings import RuntimeConfig
from streamer.loader import load_engine
from streamer.generation.generate import prefill
path, ids, chunk, share = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
m = json.loads(open(path + "/manifest.json").read())
total = sum(l["num_experts"] * l["block_bytes"] for l in m["layers"])
engine = load_engine(path, RuntimeConfig(cache_bytes=int(share * total) + 1, io_mode="direct"))
if share >= 1:
    engine.runtime.preload()
cache = engine.model.make_cache()
start = time.perf_counter()
mx.eval(prefill(engine.model, ids, cache, chunk=chunk))
print(json.dumps({"tps": len(ids) / (time.perf_counter() - start), **engine.stats()}))
"""

_MLX_LM_TPS = """
import json, sys, time
import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache
model, _ = mlx_lm.load(sys.argv[1])
ids, chunk = json.loads(sys.argv[2]), int(sys.argv[3])
cache = make_prompt_cache(model)
start = time.perf_counter()
for s in range(0, len(ids), chunk):  # mlx-lm's own prefill loop: chunks, then the cache state evaluated
    logits = model(mx.array([ids[s:s + chunk]]), cache=cache)
    mx.eval(logits[:, -1, :], [c.state for c in cache])
print(json.dumps({"tps": len(ids) / (time.perf_counter() - start)}))
"""


def child(code: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def small_model() -> tuple[Path, Path]:
    from streamer.storage.repack import run_repack
    from streamer.storage.repack_plan import make_plan
    from streamer.synthetic.presets import get_preset
    from streamer.synthetic.writer import generate

    src, dst = WORK / "like-397b-8L-src", WORK / "like-397b-8L-packed"
    if not src.exists():
        generate(src, get_preset("like-397b", num_layers=8), dtype="float32", seed=0)
    if not (dst / "manifest.json").exists():
        run_repack(make_plan(src, dst))
    return src, dst


def vocab_of(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    return config.get("text_config", config)["vocab_size"]


def bytes_study(packed: Path, n_tokens: int, chunk: int, share: float) -> dict:
    ids = random.Random(0).choices(range(vocab_of(packed)), k=n_tokens)
    drop_caches()
    out = child(_BYTES, packed, json.dumps(ids), chunk, share)
    rows = out["rows"]
    per_chunk = {}
    for r in rows:
        c = per_chunk.setdefault(r["chunk"], {"bytes": 0, "union_bytes": 0})
        c["bytes"] += r["bytes"]
        c["union_bytes"] += r["union_bytes"]
    ratios = [c["bytes"] / c["union_bytes"] for c in per_chunk.values()]
    worst_layer = max(r["reads"] / r["distinct"] for r in rows)
    wide = sum(r["distinct"] > out["slots"] for r in rows)
    return {"ratios": ratios, "max": max(ratios), "worst_layer": worst_layer, "slots": out["slots"],
            "wide_calls": wide, "calls": len(rows),
            "union_per_call": sum(r["distinct"] for r in rows) / len(rows)}  # fmt: skip


def speed_study(src: Path, packed: Path, n_tokens: int, chunk: int, vocab: int, cold_share: float) -> dict:
    ids = json.dumps(random.Random(1).choices(range(vocab), k=n_tokens))
    best = {"mlx-lm": 0.0, "cached": 0.0, "cold": 0.0}
    for _ in range(2):
        best["mlx-lm"] = max(best["mlx-lm"], child(_MLX_LM_TPS, src, ids, chunk)["tps"])
        best["cached"] = max(best["cached"], child(_STREAMER_TPS, packed, ids, chunk, 1.0)["tps"])
        drop_caches()
        best["cold"] = max(best["cold"], child(_STREAMER_TPS, packed, ids, chunk, cold_share)["tps"])
    return best


def describe(name: str, b: dict, chunk: int, share: float) -> str:
    return (f"{name}: chunk {chunk}, cache {share:.0%} ({b['slots']} slots), {b['union_per_call']:.0f} distinct "
            f"experts per layer call, {b['wide_calls']}/{b['calls']} calls wider than the cache; bytes read / "
            f"union per chunk: {' '.join(f'{r:.3f}' for r in b['ratios'])} (max {b['max']:.3f}); worst "
            f"(chunk, layer) reads / distinct {b['worst_layer']:.3f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--skip-full-width", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    src, dst = small_model()
    rows = []
    cases = [("like-397b 8L", dst, args.tokens, args.chunk, share) for share in (0.1, 1.0)]
    if not args.skip_full_width:
        cases += [("full-width 4L", FULL_WIDTH, 128, 64, 0.1)]
    for name, packed, n, chunk, share in cases:
        b = bytes_study(packed, n, chunk, share)
        print(describe(name, b, chunk, share), flush=True)
        rows.append(row(f"{name} f32, {n} random-id tokens, chunk {chunk}, cache {share:.0%}, direct I/O",
                        "P6 prefill expert bytes read / union of routed experts (max over chunks)", b["max"], b["max"],
                        describe(name, b, chunk, share).split(": ", 1)[1]))  # fmt: skip

    cold = 0.1
    speed = speed_study(src, dst, args.tokens, args.chunk, vocab_of(src), cold)
    print(f"prefill tok/s: mlx-lm {speed['mlx-lm']:.1f}, streamer all cached {speed['cached']:.1f} "
          f"({speed['cached'] / speed['mlx-lm']:.3f}), streamer cold {cold:.0%} cache {speed['cold']:.1f} "
          f"({speed['cold'] / speed['mlx-lm']:.3f})")  # fmt: skip
    config = f"like-397b 8L f32, {args.tokens} tokens, chunk {args.chunk}"
    note = (f"mlx-lm {speed['mlx-lm']:.1f} tok/s; best of 2 alternated runs; streamer cold ({cold:.0%} cache, direct I/O) "
            f"{speed['cold']:.1f} tok/s = {speed['cold'] / speed['mlx-lm']:.3f}; 2 cores shared with a training job")  # fmt: skip
    rows.append(row(config, "P6 prefill tok/s streamer (all cached) vs mlx-lm", speed["cached"],
                    speed["cached"] / speed["mlx-lm"], note))  # fmt: skip
    if not args.no_record:
        append_results(rows)


if __name__ == "__main__":
    main()
