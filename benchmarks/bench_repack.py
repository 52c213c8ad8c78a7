"""Repack throughput vs a plain copy of the same shards, on the same disk, in one run.

    python benchmarks/bench_repack.py --layers 2            # generates a full-width checkpoint (~8.5 GB)
    python benchmarks/bench_repack.py --src DIR --work DIR  # an existing checkpoint

Copy (``shutil.copyfile`` of every shard, i.e. in-kernel sendfile, + fsync) and repack (``run_repack``,
which also checksums and re-reads every layer) each run in a child process from a cold page cache
(``echo 3 > /proc/sys/vm/drop_caches`` as root), alternated for ``--rounds`` because this disk throttles
after bursts; then ``verify_packed`` from a cold cache. Children report wall time, CPU time and peak RSS;
CPU seconds per GB is the number that survives a busy shared machine. Outputs are deleted between
phases (disk never holds more than source + one copy). Appends lines to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, drop_caches  # noqa: E402

# Each child prints "<wall seconds> <bytes> <cpu seconds> <peak rss bytes>".
_FOOTER = """
r = resource.getrusage(resource.RUSAGE_SELF)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(secs, nbytes, r.ru_utime + r.ru_stime, r.ru_maxrss * scale)
"""
_CHILDREN = {
    "copy": """
import os, resource, shutil, sys, time
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
start, nbytes = time.monotonic(), 0
for shard in sorted(src.glob("*.safetensors")):
    shutil.copyfile(shard, dst / shard.name)
    with open(dst / shard.name, "rb") as f:
        os.fsync(f.fileno())
    nbytes += shard.stat().st_size
secs = time.monotonic() - start
"""
    + _FOOTER,
    "repack": """
import resource, sys, time
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
plan = make_plan(sys.argv[1], sys.argv[2])
start = time.monotonic()
nbytes = run_repack(plan).bytes_written
secs = time.monotonic() - start
"""
    + _FOOTER,
    "verify": """
import resource, sys, time
from streamer.storage.verify import verify_packed
start = time.monotonic()
nbytes = verify_packed(sys.argv[1]).total_bytes
secs = time.monotonic() - start
"""
    + _FOOTER,
}


def run_child(phase: str, *args: str) -> list[float]:
    drop_caches()
    out = subprocess.run(
        [sys.executable, "-c", _CHILDREN[phase], *args], check=True, capture_output=True, text=True
    )
    return [float(x) for x in out.stdout.split()]


def cpu_pressure() -> str:
    try:  # share of time some task waited for a CPU (other sessions share these cores)
        return Path("/proc/pressure/cpu").read_text().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="existing checkpoint (else one is generated)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the generated full-width checkpoint")
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamer-bench-repack"))
    ap.add_argument("--rounds", type=int, default=2, help="copy/repack rounds, alternated")
    ap.add_argument("--keep", action="store_true", help="keep the generated source")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results.tsv")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    src = args.src or args.work / f"full-width-{args.layers}"
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr)
        cmd = "from streamer.cli.main import main; main()"
        subprocess.run(
            [sys.executable, "-c", cmd, "synthetic", "full-width", str(src), "--layers", str(args.layers)]
        )
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    free = shutil.disk_usage(args.work).free
    if free < 1.2 * size:
        sys.exit(f"need {1.2 * size / 1e9:.1f} GB free in {args.work}, have {free / 1e9:.1f} GB")

    cold, pressure_before = drop_caches(), cpu_pressure()
    totals = {"copy": [0.0, 0.0, 0.0, 0.0], "repack": [0.0, 0.0, 0.0, 0.0]}
    out = {"copy": args.work / "copy", "repack": args.work / "packed"}
    for _ in range(args.rounds):
        for phase in ("copy", "repack"):
            shutil.rmtree(out[phase], ignore_errors=True)
            secs, nbytes, cpu, rss = run_child(phase, str(src), str(out[phase]))
            t = totals[phase]
            t[0], t[1], t[2], t[3] = t[0] + secs, t[1] + nbytes, t[2] + cpu, max(t[3], rss)
            print(
                f"{phase:7} {secs:6.1f} s  {nbytes / secs / 1e9:.2f} GB/s  cpu {cpu:.1f} s", file=sys.stderr
            )
            if phase == "copy":
                shutil.rmtree(out[phase])
    verify_s, verify_bytes, verify_cpu, _ = run_child("verify", str(out["repack"]))
    shutil.rmtree(out["repack"])
    if args.src is None and not args.keep:
        shutil.rmtree(src)

    (copy_s, copy_n, copy_cpu, _), (rep_s, rep_n, rep_cpu, rss) = totals["copy"], totals["repack"]
    copy_bps, rep_bps, verify_bps = copy_n / copy_s, rep_n / rep_s, verify_bytes / verify_s
    copy_cpg, rep_cpg = copy_cpu / (copy_n / 1e9), rep_cpu / (rep_n / 1e9)
    pressure = f"cpu pressure avg60 {pressure_before} before, {cpu_pressure()} after"
    print(f"source {size / 1e9:.2f} GB; page cache dropped: {cold}; {pressure}")
    print(f"copy    {copy_s:6.1f} s  {copy_bps / 1e9:.2f} GB/s  {copy_cpg:.2f} cpu s/GB")
    print(
        f"repack  {rep_s:6.1f} s  {rep_bps / 1e9:.2f} GB/s  {rep_cpg:.2f} cpu s/GB  ratio {rep_bps / copy_bps:.2f}"
    )
    print(f"verify  {verify_s:6.1f} s  {verify_bps / 1e9:.2f} GB/s  peak repack RSS {rss / 1e6:.0f} MB")
    if args.no_record:
        return

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    machine = f"{platform.system()} {platform.machine()} {os.cpu_count()} cpu (shared)"
    config = f"{src.name} {size / 1e9:.1f} GB, {args.rounds} rounds" + ("" if cold else ", warm cache")
    date = datetime.date.today().isoformat()
    note = f"cold cache per phase; copy = shutil.copyfile+fsync; repack incl. verify-after-write; {pressure}"
    rows = [
        ["copy_GBps", f"{copy_bps / 1e9:.3f}", "1.00", "baseline; " + note],
        ["repack_GBps", f"{rep_bps / 1e9:.3f}", f"{rep_bps / copy_bps:.2f}", note],
        ["copy_cpu_s_per_GB", f"{copy_cpg:.2f}", "1.00", "user+sys of the copy child"],
        [
            "repack_cpu_s_per_GB",
            f"{rep_cpg:.2f}",
            f"{rep_cpg / copy_cpg:.2f}",
            "user+sys of the repack child",
        ],
        ["repack_peak_rss_MB", f"{rss / 1e6:.0f}", "", "ru_maxrss of the repack child"],
        [
            "verify_GBps",
            f"{verify_bps / 1e9:.3f}",
            f"{verify_bps / copy_bps:.2f}",
            "verify_packed, cold cache",
        ],
    ]
    append_results([[date, commit, machine, config, *row] for row in rows])


if __name__ == "__main__":
    main()
