"""P3, a smaller machine: both engines inside a memory cgroup limited to about half the checkpoint.

    python benchmarks/bench_cgroup.py                      # the full-width 4-layer checkpoint, 8 GB limit
    python benchmarks/bench_cgroup.py --limit-gb 6 --tokens 12

A cgroup v1 memory group (/sys/fs/cgroup/memory/streamer-bench-p3, root only) caps a child process's
memory — anonymous memory and the page cache it faults in — the way a Mac with less RAM would. Each run
is a fresh child process moved into the group before it execs; between runs the page cache is dropped
and the group is recreated so its counters (max usage, failcnt, OOM kills) belong to that run alone.

Runs, one after another:
  mlx-lm       loads the source checkpoint resident and decodes (it needs the whole checkpoint in RAM);
  streamer     the packed copy with an explicit expert cache (--cache-gb) and direct I/O;
  streamer     the packed copy with the default cache budget (derived from "RAM", see the note it prints).

Goal: streamer >= 5x mlx-lm's tok/s, or mlx-lm fails (an OOM kill shows as exit -9 with oom_kill > 0).
Takes ~3-6 minutes on the 2-core development machine (loading 16 GB and streaming). Appends to
benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import _MLX_LM, _STREAMER, PROMPT  # noqa: E402
from common import append_results, drop_caches, row  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
WORK = Path("/tmp/streamer-bench-decode")


class MemoryGroup:
    """A cgroup v1 memory group with a byte limit; ``enter`` is a preexec_fn that moves the child in."""

    def __init__(self, name: str, limit_bytes: int):
        self.path = CGROUP_ROOT / name
        self.limit_bytes = limit_bytes

    def create(self) -> None:
        self.remove()
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        try:  # no swap here, but never let the group escape its limit through it
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit_bytes))
        except OSError:
            pass

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def counters(self) -> dict:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "max_usage_gb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 1e9,
            "failcnt": int((self.path / "memory.failcnt").read_text()),
            "oom_kill": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        if self.path.exists():
            for _ in range(50):  # a killed child may take a moment to leave the group
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)
            raise RuntimeError(f"cannot remove {self.path}: processes still in it")


def run_in_group(group: MemoryGroup, argv: list[str], timeout_s: float) -> dict:
    """Runs ``argv`` in a fresh group: exit code, wall time, the child's JSON line (if any), counters."""
    drop_caches()
    group.create()
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, preexec_fn=group.enter, capture_output=True, text=True, timeout=timeout_s)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
    result = {"rc": rc, "wall_s": time.perf_counter() - start, **group.counters()}
    lines = [l for l in (out or "").strip().splitlines() if l.startswith("{")]
    if rc == 0 and lines:
        result.update(json.loads(lines[-1]))
    else:
        result["stderr_tail"] = (err if isinstance(err, str) else err.decode())[-300:]
    group.remove()
    return result


def describe(name: str, r: dict) -> str:
    if r["rc"] != 0:
        how = "OOM-killed" if r["rc"] == -9 and r["oom_kill"] else f"failed (exit {r['rc']})"
        tail = "" if r["rc"] == -9 else f"; {r.get('stderr_tail', '').strip().splitlines()[-1:]}"
        return f"{name}: {how} after {r['wall_s']:.0f} s (peak {r['max_usage_gb']:.2f} GB, failcnt {r['failcnt']}, oom_kill {r['oom_kill']}){tail}"
    return f"{name}: {1 / r['decode_s_per_token']:.3f} tok/s, peak {r['max_usage_gb']:.2f} GB, failcnt {r['failcnt']}, wall {r['wall_s']:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=WORK / "full-width-4L-v576-src")
    ap.add_argument("--packed", type=Path, default=WORK / "full-width-4L-v576-packed")
    ap.add_argument("--limit-gb", type=float, default=None, help="default: half the source checkpoint")
    ap.add_argument("--cache-gb", type=float, default=None, help="default: limit - resident - 2 GB")
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        sys.exit("P3 needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")

    src_bytes = sum(p.stat().st_size for p in args.src.iterdir() if p.is_file())
    manifest = json.loads((args.packed / "manifest.json").read_text())
    resident = (args.packed / "resident.safetensors").stat().st_size
    limit = int(args.limit_gb * 1e9) if args.limit_gb else src_bytes // 2
    cache = int(args.cache_gb * 1e9) if args.cache_gb else limit - resident - 2_000_000_000
    expert_bytes = sum(l["num_experts"] * l["block_bytes"] for l in manifest["layers"])
    print(f"checkpoint {src_bytes / 1e9:.2f} GB; limit {limit / 1e9:.2f} GB ({limit / src_bytes:.0%}); "
          f"expert cache {cache / 1e9:.2f} GB ({cache / expert_bytes:.0%} of experts)", flush=True)  # fmt: skip

    group = MemoryGroup("streamer-bench-p3", limit)
    prompt, n = json.dumps(PROMPT), str(args.tokens)
    py = sys.executable
    runs = {
        "mlx-lm": [py, "-c", _MLX_LM, str(args.src), prompt, n],
        "streamer": [py, "-c", _STREAMER, str(args.packed), prompt, n, json.dumps(
            {"cache_bytes": cache, "io_mode": "direct", "threads": args.threads, "preload": False})],
        "streamer default budget": [py, "-c", "from streamer.cli.main import main; main()", "generate", str(args.packed), "--prompt-ids",
                                    ",".join(map(str, PROMPT)), "-n", "2", "--json", "--io", "direct"],
    }  # fmt: skip
    results = {}
    for name, argv in runs.items():
        results[name] = run_in_group(group, argv, args.timeout)
        print(describe(name, results[name]), flush=True)

    ours, theirs = results["streamer"], results["mlx-lm"]
    config = f"cgroup {limit / 1e9:.1f} GB = {limit / src_bytes:.0%} of {src_bytes / 1e9:.1f} GB full-width 4L f32, {args.tokens} tokens"
    ours_tps = 1 / ours["decode_s_per_token"] if ours["rc"] == 0 else 0.0
    if theirs["rc"] == 0:
        ratio: float | str = ours_tps / (1 / theirs["decode_s_per_token"])
        their_note = f"mlx-lm {1 / theirs['decode_s_per_token']:.3f} tok/s"
    else:
        ratio = "mlx-lm fails"
        their_note = (f"mlx-lm exit {theirs['rc']} after {theirs['wall_s']:.0f} s, oom_kill {theirs['oom_kill']}, "
                      f"failcnt {theirs['failcnt']}, peak {theirs['max_usage_gb']:.2f} GB")  # fmt: skip
    default = results["streamer default budget"]
    default_note = "ran" if default["rc"] == 0 else f"exit {default['rc']}, oom_kill {default['oom_kill']}"
    note = (f"{their_note}; streamer cache {cache / 1e9:.2f} GB direct I/O, peak {ours.get('max_usage_gb', 0):.2f} GB, "
            f"{ours.get('bytes_per_token', 0) / 1e6:.0f} MB/tok read; streamer with its default budget: {default_note}; "
            "2 cores shared with a training job")  # fmt: skip
    print(f"P3: {note}")
    if not args.no_record:
        append_results([row(config, "P3 decode tok/s streamer in cgroup vs mlx-lm", ours_tps, ratio, note)])


if __name__ == "__main__":
    main()
