"""What checking every expert read costs: decode with --verify-reads vs --no-verify-reads, side by side.

    python benchmarks/bench_verify_reads.py                                  # like-35b, bf16 (published layout)
    python benchmarks/bench_verify_reads.py --preset full-width --layers 1   # real 397B block size (7 MB)

Two caches: (a) cold/small (the fewest slots, top-k per layer: nearly every routed expert is read each
token) and (b) the default budget. Runs alternate on/off in one process (same page-cache state, fresh
engine each run); the best of ``--rounds`` per side is kept. Reported: decode s/token on / off (ratio >
1 = verify costs), bytes read per token, and the raw zlib.crc32 throughput of one core. Also: how long
`streamer repack` takes to re-check a complete copy (per GB), since it now does before "already packed".
Appends rows to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, row  # noqa: E402

PROMPT = [11, 400, 23, 7, 150, 300, 42, 5]


def decode(path: Path, verify: bool, cache_experts: int | None, tokens: int) -> dict:
    import mlx.core as mx

    from streamer.loader import load_engine
    from streamer.settings import RuntimeConfig

    with load_engine(path, RuntimeConfig(cache_experts=cache_experts, verify_reads=verify)) as engine:
        store, spent = engine.runtime.store, [0.0]
        check = store._check

        def timed(*a):  # the CRC work itself, on the reader threads
            t = time.perf_counter()
            try:
                return check(*a)
            finally:
                spent[0] += time.perf_counter() - t

        store._check = timed
        cache = engine.model.make_cache()
        logits = engine.model(mx.array([PROMPT]), cache=cache)[0, -1]
        token = int(mx.argmax(logits).item())
        before, spent[0] = engine.stats(), 0.0
        start = time.perf_counter()
        for _ in range(tokens):
            logits = engine.model(mx.array([[token]]), cache=cache)[0, -1]
            token = int(mx.argmax(logits).item())
        secs = time.perf_counter() - start
        after = engine.stats()
    return {
        "s_per_token": secs / tokens,
        "crc_s_per_token": spent[0] / tokens,
        "bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / tokens,
        "misses_per_token": (after["cache_misses"] - before["cache_misses"]) / tokens,
        "cache_bytes": after["cache_bytes"],
    }


def crc_gb_per_s() -> float:
    buf = bytes(range(256)) * (1 << 18)  # 64 MiB
    start = time.perf_counter()
    for _ in range(4):
        zlib.crc32(buf)
    return 4 * len(buf) / (time.perf_counter() - start) / 1e9


def build(args) -> tuple[Path, Path]:
    from click.testing import CliRunner

    from streamer.cli.main import main

    name = f"{args.preset}-{args.layers or 'preset'}L-bf16"
    src, dst = args.work / f"{name}-src", args.work / f"{name}-packed"
    if not (dst / "manifest.json").exists():
        cmd = ["synthetic", args.preset, str(src), "--dtype", "bfloat16"]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        if args.preset == "full-width":
            cmd += ["--vocab-size", "576"]
        for c in (cmd, ["repack", str(src), str(dst)]):
            result = CliRunner().invoke(main, c)
            assert result.exit_code == 0, result.output
    return src, dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="like-35b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_verify_reads"))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    from streamer.storage.packed import read_manifest
    from streamer.storage.repack import run_repack
    from streamer.storage.repack_plan import make_plan

    src, dst = build(args)
    m = read_manifest(dst)
    top_k = __import__("json").loads((dst / "config.json").read_text())
    top_k = (top_k.get("text_config") or top_k)["num_experts_per_tok"]
    crc = crc_gb_per_s()
    config = f"{args.preset} {len(m.layers)}L bf16, block {m.layers[0].block_bytes:,} B, {args.tokens} tokens"
    rows = []
    for label, cache in (("small cache (top-k slots)", top_k), ("default cache", None)):
        best = {True: None, False: None}
        for _ in range(args.rounds):
            for verify in (True, False):
                r = decode(dst, verify, cache, args.tokens)
                if best[verify] is None or r["s_per_token"] < best[verify]["s_per_token"]:
                    best[verify] = r
        on, off = best[True], best[False]
        ratio = on["s_per_token"] / off["s_per_token"]
        share = on["crc_s_per_token"] / off["s_per_token"]  # CPU time of the checks ÷ decode time
        note = (
            f"CRC work {on['crc_s_per_token'] * 1e6:.0f} us/tok = {share:.2%} of decode (upper bound: "
            "it runs on reader threads); "
            f"on {on['s_per_token'] * 1e3:.2f} ms/tok, off {off['s_per_token'] * 1e3:.2f} ms/tok; "
            f"{on['misses_per_token']:.1f} misses, {on['bytes_per_token'] / 1e6:.2f} MB read/tok; "
            f"cache {on['cache_bytes'] / 1e6:.1f} MB of {m.expert_bytes / 1e6:.1f} MB; "
            f"zlib.crc32 {crc:.1f} GB/s/core; best of {args.rounds} alternated; page cache warm"
        )
        print(f"{label}: verify on/off decode time {ratio:.3f}, CRC share {share:.2%}  ({note})")
        rows.append(row(f"{config}, {label}", "verify-reads decode s/tok on ÷ off", ratio, ratio, note))

    start = time.monotonic()
    result = run_repack(make_plan(src, dst))
    secs = time.monotonic() - start
    assert result.status == "already packed", result.status
    gb = (m.total_bytes + sum(f["bytes"] for f in m.files.values())) / 1e9
    note = f"{gb:.3f} GB re-checked in {secs:.2f} s; page cache warm (a cold SSD adds its read time)"
    print(f"repack re-check: {secs / gb:.2f} s/GB ({note})")
    rows.append(
        row(
            f"{args.preset} {len(m.layers)}L bf16",
            "repack re-check s/GB (already packed)",
            secs / gb,
            "",
            note,
        )
    )
    if not args.no_append:
        append_results(rows)


if __name__ == "__main__":
    main()
