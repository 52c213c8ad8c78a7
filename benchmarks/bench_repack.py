"""Repack throughput vs a plain copy of the same shards, on the same disk, in one run.

    python benchmarks/bench_repack.py --layers 2            # generates a full-width checkpoint (~8.5 GB)
    python benchmarks/bench_repack.py --src DIR --work DIR  # an existing checkpoint

Phases, each from a cold page cache when run as root (``echo 3 > /proc/sys/vm/drop_caches``):
copy (``shutil.copyfile`` of every shard + fsync) and repack (``run_repack`` in a child process, which
reports its peak RSS), alternated for ``--rounds``; then verify (``verify_packed``). Outputs are
deleted between phases so the disk never holds more than source + one copy. Appends lines to
benchmarks/results.tsv (throughputs are totals over the rounds).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results.tsv"
COLUMNS = ["date", "commit", "machine", "config", "metric", "value", "ratio", "note"]

# Runs in a child so its peak RSS is the repack's own; prints "<seconds> <bytes> <peak rss bytes>".
_REPACK_CHILD = """
import resource, sys, time
from streamer.repack import make_plan, run_repack
plan = make_plan(sys.argv[1], sys.argv[2])
start = time.monotonic()
result = run_repack(plan)
secs = time.monotonic() - start
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(secs, result.bytes_written, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
"""

_VERIFY_CHILD = """
import sys, time
from streamer.packed import verify_packed
start = time.monotonic()
m = verify_packed(sys.argv[1])
print(time.monotonic() - start, m.total_bytes)
"""


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_copy(src: Path, dst: Path) -> tuple[float, int]:
    dst.mkdir(parents=True)
    start, total = time.monotonic(), 0
    for shard in sorted(src.glob("*.safetensors")):
        shutil.copyfile(shard, dst / shard.name)
        with open(dst / shard.name, "rb") as f:
            os.fsync(f.fileno())
        total += shard.stat().st_size
    return time.monotonic() - start, total


def child(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return [float(x) for x in out.stdout.split()]


def append_results(rows: list[list[str]]) -> None:
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("\t".join(COLUMNS) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="existing checkpoint (else one is generated)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the generated full-width checkpoint")
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamer-bench-repack"))
    ap.add_argument("--keep", action="store_true", help="keep the generated source and packed output")
    ap.add_argument("--rounds", type=int, default=2, help="copy/repack rounds, alternated")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results.tsv")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    src = args.src
    if src is None:
        src = args.work / f"full-width-{args.layers}"
        if not src.exists():
            print(f"generating {src} ...", file=sys.stderr)
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from streamer.cli import main; main()",
                    "synthetic",
                    "full-width",
                    str(src),
                    "--layers",
                    str(args.layers),
                ],
                check=True,
            )
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    free = shutil.disk_usage(args.work).free
    if free < 1.2 * size:
        sys.exit(f"need {1.2 * size / 1e9:.1f} GB free in {args.work}, have {free / 1e9:.1f} GB")

    # Alternate the phases: this disk throttles after bursts, so a fixed order would favour one side.
    packed, cold = args.work / "packed", drop_caches()
    copy_s = repack_s = 0.0
    copy_bytes = repack_bytes = rss = 0
    for _ in range(args.rounds):
        for phase in ("copy", "repack"):
            drop_caches()
            if phase == "copy":
                secs, n = timed_copy(src, args.work / "copy")
                shutil.rmtree(args.work / "copy")
                copy_s, copy_bytes = copy_s + secs, copy_bytes + n
            else:
                shutil.rmtree(packed, ignore_errors=True)
                secs, n, peak = child(_REPACK_CHILD, str(src), str(packed))
                repack_s, repack_bytes, rss = repack_s + secs, repack_bytes + int(n), max(rss, peak)
            print(f"{phase:7} {secs:6.1f} s  {n / secs / 1e9:.2f} GB/s", file=sys.stderr)

    drop_caches()
    verify_s, verify_bytes = child(_VERIFY_CHILD, str(packed))
    if not args.keep:
        shutil.rmtree(packed)
        if args.src is None:
            shutil.rmtree(src)

    copy_bps, repack_bps, verify_bps = copy_bytes / copy_s, repack_bytes / repack_s, verify_bytes / verify_s
    ratio = repack_bps / copy_bps
    print(f"source {size / 1e9:.2f} GB; page cache dropped: {cold}")
    print(f"copy    {copy_s:6.1f} s  {copy_bps / 1e9:.2f} GB/s")
    print(
        f"repack  {repack_s:6.1f} s  {repack_bps / 1e9:.2f} GB/s  ratio {ratio:.2f}  "
        f"peak RSS {rss / 1e6:.0f} MB"
    )
    print(f"verify  {verify_s:6.1f} s  {verify_bps / 1e9:.2f} GB/s")

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    machine = f"{platform.system()} {platform.machine()} {os.cpu_count()} cpu"
    config = f"{src.name} {size / 1e9:.1f} GB" + ("" if cold else " (warm cache)")
    date = datetime.date.today().isoformat()
    note = "cold cache each phase; copy = shutil.copyfile+fsync per shard; repack includes verify-after-write"
    if args.no_record:
        return
    append_results(
        [
            [
                date,
                commit,
                machine,
                config,
                "copy_GBps",
                f"{copy_bps / 1e9:.3f}",
                "1.00",
                "baseline; " + note,
            ],
            [date, commit, machine, config, "repack_GBps", f"{repack_bps / 1e9:.3f}", f"{ratio:.2f}", note],
            [
                date,
                commit,
                machine,
                config,
                "repack_peak_rss_MB",
                f"{rss / 1e6:.0f}",
                "",
                "child process ru_maxrss",
            ],
            [
                date,
                commit,
                machine,
                config,
                "verify_GBps",
                f"{verify_bps / 1e9:.3f}",
                f"{verify_bps / copy_bps:.2f}",
                "streamer verify, cold cache; ratio vs copy",
            ],
        ]
    )


if __name__ == "__main__":
    main()
