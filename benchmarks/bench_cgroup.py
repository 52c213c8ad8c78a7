"""P3, a smaller machine: streamer inside a memory cgroup of half the checkpoint vs mlx-lm unconstrained.

    python benchmarks/bench_cgroup.py                      # issue 15's model, both layouts (~3 min)
    python benchmarks/bench_cgroup.py --layouts bf16 --limit-share 0.5 --tokens 32

The model is issue 15's (hidden 1024, 8 layers, 128 experts top-8, moe_intermediate 512, 4-bit; ~0.9 GB
in the published layout, built once in /tmp/streamer-bench-decode), in the published layout (bf16 scales
and biases: P3's layout) and its float32 variant. A cgroup v1 memory group
(/sys/fs/cgroup/memory/streamer-bench-p3, root only) caps a child process's memory — anonymous memory and
the page cache it faults in — the way a Mac with less RAM would. Each run is a fresh child process moved
into the group before it execs; between runs the page cache is dropped and the group is recreated so its
counters (max usage, failcnt, OOM kills) belong to that run alone.

Per layout: mlx-lm in the group once (does it fit?); then, alternated --rounds times, mlx-lm
unconstrained and streamer in the group with direct I/O, its cache at the default budget (derived from the
group's limit) and at half the group. P3 = streamer tok/s ÷ mlx-lm unconstrained on the f32 variant
(float32 activations; mlx-lm on the bf16 layout runs bfloat16 activations and is recorded too).
Goal: >= 0.9. Appends to benchmarks/results.tsv.
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
    ap.add_argument("--layouts", default="bf16,f32", help="bf16 (published; P3's layout) and/or f32")
    ap.add_argument(
        "--limit-share", type=float, default=0.5, help="cgroup limit as a share of the checkpoint"
    )
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the timed runs")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        sys.exit("P3 needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    pairs = build_pair(args.work, "issue15", synthetic_maker(issue15_preset()))
    prompt, n = json.dumps(PROMPT), str(args.tokens)
    py = sys.executable
    desc = "issue15 (hidden 1024, 8L, 128 x top-8, inter 512, 4-bit)"

    def streamer(layout: str, **opts) -> list[str]:
        opts = {"io_mode": "direct", "threads": args.threads, "preload": False, **opts}
        return [py, "-c", _STREAMER, str(pairs[layout][1]), prompt, n, json.dumps(opts)]

    def mlx_lm(layout: str) -> list[str]:
        return [py, "-c", _MLX_LM, str(pairs[layout][0]), prompt, n]

    def unconstrained(argv: list[str]) -> dict:
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    load_before = load_note()
    # mlx-lm unconstrained on both layouts: f32 variant (f32 activations) is the reference.
    free: dict[str, list[dict]] = {}
    constrained: dict[str, list[dict]] = {}
    layouts = args.layouts.split(",")
    geometry = {}
    for layout in layouts:
        src, dst = pairs[layout]
        src_bytes = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
        manifest = json.loads((dst / "manifest.json").read_text())
        expert_bytes = sum(l["num_experts"] * l["block_bytes"] for l in manifest["layers"])
        limit = int(src_bytes * args.limit_share)
        geometry[layout] = (MemoryGroup("streamer-bench-p3", limit), limit, src_bytes, expert_bytes)
        print(f"{layout}: checkpoint {src_bytes / 1e9:.3f} GB, experts {expert_bytes / 1e9:.3f} GB; cgroup "
              f"{limit / 1e9:.3f} GB ({args.limit_share:.0%}); half-cgroup cache {limit / 2e9:.3f} GB "
              f"({limit / 2 / expert_bytes:.0%} of experts)", flush=True)  # fmt: skip
        r = run_in_group(geometry[layout][0], mlx_lm(layout), args.timeout)
        print(describe(f"  mlx-lm {layout} in the cgroup", r), flush=True)
        constrained[f"mlx-lm {layout}"] = [r]
    # Every timed run alternates with the others in one sequence (the reference included), so a change
    # of load between minutes spreads over all of them.
    order = [("mlx-lm", "f32")] + [
        (side, layout) for layout in layouts for side in ("default", "half", "all")
    ]
    order += [("mlx-lm", layout) for layout in layouts if layout != "f32"]
    for r_i in range(args.rounds):
        for side, layout in order if r_i % 2 == 0 else order[::-1]:
            group, limit, src_bytes, expert_bytes = geometry.get(layout, geometry[layouts[0]])
            if side == "mlx-lm":
                free.setdefault(f"mlx-lm {layout}", []).append(unconstrained(mlx_lm(layout)))
                print(
                    f"  mlx-lm {layout} unconstrained: {1 / free[f'mlx-lm {layout}'][-1]['decode_s_per_token']:.2f} tok/s",
                    flush=True,
                )
                continue
            if side == "all":  # streamer unconstrained, every expert preloaded: the cost of streaming
                res = unconstrained(streamer(layout, cache_bytes=4 * expert_bytes, preload=True))
                free.setdefault(f"streamer {layout} all cached", []).append(res)
                print(
                    f"  streamer {layout} all cached, unconstrained: {1 / res['decode_s_per_token']:.2f} tok/s",
                    flush=True,
                )
                continue
            opts = {} if side == "default" else {"cache_bytes": limit // 2}
            r = run_in_group(group, streamer(layout, **opts), args.timeout)
            r["limit"], r["src_bytes"], r["expert_bytes"] = limit, src_bytes, expert_bytes
            print(describe(f"  streamer {layout} cache {side} in the cgroup", r)
                  + (f", cache {r.get('cache_bytes', 0) / 1e6:.0f} MB, {r.get('misses_per_token', 0):.1f} misses/tok"
                     if r["rc"] == 0 else ""), flush=True)  # fmt: skip
            constrained.setdefault(f"streamer {layout} {side}", []).append(r)
    load = f"{load_before} before, {load_note()} after"

    def best(rs: list[dict]) -> dict:
        ok = [r for r in rs if r.get("rc", 0) == 0 and "decode_s_per_token" in r]
        return min(ok, key=lambda r: r["decode_s_per_token"]) if ok else rs[-1]

    ref = 1 / best(free["mlx-lm f32"])["decode_s_per_token"]
    print("mlx-lm unconstrained: " + ", ".join(
        f"{k} {1 / best(v)['decode_s_per_token']:.2f} tok/s ({best(v)['activation']} activations)" for k, v in free.items()))  # fmt: skip
    for layout in layouts:
        cg = constrained[f"mlx-lm {layout}"][0]
        cg_note = ("ran" if cg["rc"] == 0 else
                   ("OOM-killed" if cg["oom_kill"] else f"exit {cg['rc']}")) + f", peak {cg['max_usage_gb']:.2f} GB"  # fmt: skip
        same = 1 / best(free[f"mlx-lm {layout}"])["decode_s_per_token"]
        cached = 1 / best(free[f"streamer {layout} all cached"])["decode_s_per_token"]
        for side in ("default", "half"):
            r = best(constrained[f"streamer {layout} {side}"])
            if r["rc"] != 0:
                tps: float = 0.0
            else:
                tps = 1 / r["decode_s_per_token"]
            cache_text = "default budget" if side == "default" else "cache = half the cgroup"
            config = (f"{desc}, {layout} checkpoint (scales/biases {LAYOUTS[layout]}), cgroup {r['limit'] / 1e9:.3f} GB = "
                      f"{args.limit_share:.0%} of {r['src_bytes'] / 1e9:.3f} GB, {cache_text}, direct I/O, {args.tokens} tokens")  # fmt: skip
            note = (f"layout {layout}; streamer f32 activations, cache {r.get('cache_bytes', 0) / 1e6:.0f} MB "
                    f"({r.get('cache_bytes', 0) / r['expert_bytes']:.0%} of experts), {r.get('hits_per_token', 0):.1f} hits / "
                    f"{r.get('misses_per_token', 0):.1f} misses per token, {r.get('bytes_per_token', 0) / 1e6:.1f} MB/tok read, "
                    f"stall {r.get('stall_s_per_token', 0) * 1e3:.1f} ms/tok, "
                    f"peak {r['max_usage_gb']:.3f} GB, failcnt {r['failcnt']}, oom_kill {r['oom_kill']}; ratio vs mlx-lm "
                    f"unconstrained on the f32 variant (f32 activations) {ref:.2f} tok/s; vs mlx-lm unconstrained on this "
                    f"{layout} checkpoint ({same:.2f} tok/s, {best(free[f'mlx-lm {layout}'])['activation']} activations): "
                    f"{tps / same:.3f}; vs streamer unconstrained with every expert cached ({cached:.2f} tok/s): {tps / cached:.3f}; "
                    f"mlx-lm in the same cgroup: {cg_note}; best of {args.rounds} alternated; {load}")  # fmt: skip
            print(f"P3 {layout} {side}: {tps:.2f} tok/s, ratio {tps / ref:.3f}; {note}")
            rows.append(
                row(
                    config, "P3 decode tok/s streamer in cgroup vs mlx-lm unconstrained", tps, tps / ref, note
                )
            )
    if not args.no_record:
        append_results(rows)


if __name__ == "__main__":
    main()
