"""P8: two pipeline ranks, each in a memory cgroup of 25 % of the checkpoint, vs one process in 25 % and in 50 %.

    python benchmarks/bench_pipeline_memory.py                 # issue15 geometry, 24 layers (2.8 GB), ~10 min
    python benchmarks/bench_pipeline_memory.py --tokens 8 --rounds 1 --no-record   # a smoke run

Is splitting a model over two machines' memory worth it? Here the two "machines" are two ranks of
``mlx.launch --backend ring -n 2`` on loopback, each moved into its own cgroup v1 memory group
(/sys/fs/cgroup/memory, root only) before it execs ``streamer generate``; the comparison is one
``streamer generate`` process in a group of the same size (25 %) and in one twice as big (50 %). A memory
group caps anonymous memory *and* the page cache the process faults in, so with the default flags
(buffered I/O) what the group cannot hold really comes from the disk. Every process sizes its own expert
cache from its own group (``--cache-gb`` left at its default: experts/budget.py reads the cgroup limit).

The model: issue 15's geometry (hidden 1024, 128 experts top-8, moe_intermediate 512, 4-bit) with 24 layers,
in the published layout (bf16 scales and biases; float32 activations, the CPU default), built once in
``--work`` (scratch/, gitignored): ``streamer synthetic``'s writer, then ``streamer repack``.

Per run: a fresh group per process; the checkpoint's pages evicted from the page cache first
(posix_fadvise DONTNEED on its files: no global drop_caches); greedy decode of ``--tokens`` tokens after a
10-token prompt. Measured: decode tok/s (generate's ``decode_tps``), hit rate, MB read per generated token
(the expert reads streamer asked for; prefill included), disk MB per token (the block-layer input of the
process tree, getrusage ru_inblock: what did not come from the page cache, startup included), bytes over
the wire per generated token (every rank's ``bytes_sent``; prefill's hidden states included), peak group
memory. The three configurations alternate for ``--rounds`` rounds (order reversed every other round);
each is summarised by its median-tok/s run. Then the control, ``--control-rounds`` times: one process with
the 50 % process's cache and two ranks with half of it each, no group (the page cache unbounded, so reads
after the first come from memory): what the pipeline itself costs on this machine, where both ranks share
the same 2 cores (a rank waiting in ``recv`` is not idle: MLX's ring backend polls its non-blocking socket;
the loopback probe before and after the runs measures that and the round trip of one decode step's
messages). Every run's greedy tokens must be the same.

Goal: two 25 % ranks >= 0.9x one 50 % process and >= 1.5x one 25 % process. Appends one row per
configuration to benchmarks/results.tsv (value: tok/s; ratio: ÷ one process in 50 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cgroup import CGROUP_ROOT, MemoryGroup  # noqa: E402
from common import append_results, cli, issue15_preset, load_note, row  # noqa: E402

BIN = Path(sys.executable).parent
PROMPT = "5,77,301,12,9,44,500,3,18,250"
PREFIX = f"streamer-p8-{os.getpid()}-"  # group names: PREFIX + "single", PREFIX + "rank0", ...
CONFIGS = ("one-25", "one-50", "two-25")
CONTROLS = ("one-free", "two-free")
LABELS = {"one-25": "one process in 25 %", "one-50": "one process in 50 %", "two-25": "two ranks, 25 % each",
          "one-free": "control: one process, the 50 % process's cache, no group",
          "two-free": "control: two ranks, half that cache each, no group"}  # fmt: skip


def build(work: Path, layers: int) -> tuple[Path, Path]:
    """(source checkpoint, packed copy): issue 15's geometry with ``layers`` layers, published layout."""
    from streamer.synthetic.presets import _text_config
    from streamer.synthetic.writer import generate

    src, dst = work / f"issue15-{layers}L-bf16-src", work / f"issue15-{layers}L-bf16-packed"
    if not (src / "config.json").exists():
        preset = issue15_preset()
        config = _text_config(**{**preset.text_config, "num_hidden_layers": layers})
        generate(src, dataclasses.replace(preset, name=f"issue15-{layers}L", text_config=config))
    if not (dst / "manifest.json").exists():
        cli("repack", str(src), str(dst))
    return src, dst


def evict(packed: Path) -> None:
    """Drops the packed model's pages from the page cache (a group's pages outlive the group)."""
    for f in packed.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def free_port_base(ranks: int) -> int:
    """A port with ``ranks`` free ports from it (mlx.launch's ring listens on port + rank), below the
    ephemeral range: a port there can be taken by any outgoing connection between this check and the bind."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS's range starts at 49152
    for _ in range(50):
        base = random.randrange(10000, min(low, 49152) - ranks)
        try:
            for p in range(base, base + ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


_PING = """
import sys, time
import mlx.core as mx
g = mx.distributed.init(strict=True)
rank, peer, hidden, n = g.rank(), 1 - g.rank(), int(sys.argv[1]), int(sys.argv[2])
header, h = mx.zeros((5,), dtype=mx.int32), mx.zeros((1, 1, hidden), dtype=mx.float32)
def hop(send):  # one decode step's messages: an int32 header and a [1, 1, H] hidden state
    for x in (header, h):
        mx.eval(mx.distributed.send(x, peer, group=g) if send else mx.distributed.recv(x.shape, x.dtype, peer, group=g))
for i in range(n + 20):
    if i == 20:
        start = time.perf_counter()
    hop(rank == 0)
    hop(rank == 1)
rt_ms = (time.perf_counter() - start) / n * 1e3
if rank == 1:  # rank 1 "computes" for 2 s: what does rank 0 spend while it waits in recv?
    time.sleep(2)
    mx.eval(mx.distributed.send(h, 0, group=g))
else:
    cpu, wall = time.process_time(), time.perf_counter()
    mx.eval(mx.distributed.recv(h.shape, h.dtype, 1, group=g))
    print(rt_ms, (time.process_time() - cpu) / (time.perf_counter() - wall))
"""


def round_trip_ms(hidden: int, n: int = 300) -> tuple[float, float]:
    """Loopback round trip of one decode step's messages (header + [1, 1, H] float32 each way), in ms, and
    the CPU a rank uses while it waits in recv (CPU seconds per second: 1.0 = one core spinning)."""
    argv = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_base(2)),
            "--", sys.executable, "-c", _PING, str(hidden), str(n)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, start_new_session=True)
    rt_ms, spin = out.stdout.strip().splitlines()[-1].split()
    return float(rt_ms), float(spin)


def run_config(
    config: str, packed: Path, limits: dict[str, int], gen_args: list[str], timeout_s: float,
    cache_bytes: int = 0,
) -> dict:  # fmt: skip
    """One run of ``config`` in fresh groups: generate's JSON plus disk bytes, wall time, group counters."""
    streamer = str(BIN / "streamer")
    launch = [
        str(BIN / "mlx.launch"),
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(free_port_base(2)),
        "--",
    ]
    groups: list[MemoryGroup] = []
    preexec = None
    if config.endswith("-free"):  # the control: no group, the cache given (per rank: half)
        ranks = 2 if config == "two-free" else 1
        cache = ["--cache-gb", f"{cache_bytes / ranks / 1e9:.6f}"]
        argv = [*(launch if ranks == 2 else []), streamer, *gen_args, *cache]
    elif config == "two-25":
        groups = [MemoryGroup(f"{PREFIX}rank{r}", limits["25"]) for r in range(2)]
        enter = (f'echo $$ > {CGROUP_ROOT}/{PREFIX}rank"$MLX_RANK"/cgroup.procs && exec "$0" "$@"')  # fmt: skip
        argv = [*launch, "sh", "-c", enter, streamer, *gen_args]
    else:
        groups = [MemoryGroup(f"{PREFIX}single", limits["25" if config == "one-25" else "50"])]
        argv, preexec = [streamer, *gen_args], groups[0].enter
    evict(packed)
    try:
        for g in groups:
            g.create()
        inblock = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
        start = time.perf_counter()
        # Its own session, so a run that hangs or is interrupted ends with every process it started.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=preexec, start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            out, err = "", f"timed out after {timeout_s:g} s"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        wall = time.perf_counter() - start
        disk = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - inblock) * 512
        counters = [g.counters() for g in groups]
    finally:
        for g in groups:
            g.remove()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"{config} failed (exit {proc.returncode}, {wall:.0f} s, groups {counters}):\n"
                           f"{out[-1000:]}\n{err[-3000:]}")  # fmt: skip
    result = json.loads(lines[0])
    s = result["stats"]
    n = s["generated_tokens"]
    ranks = s.get("ranks", [])
    looked = s["cache_hits"] + s["cache_misses"]
    return {
        "config": config,
        "tokens": result["token_ids"],
        "n": n,
        "tps": s["decode_tps"],
        "hit_rate": s["cache_hits"] / looked,
        "mb_per_token": s["bytes_read"] / 1e6 / n,
        "disk_mb_per_token": disk / 1e6 / n,
        "wire_bytes_per_token": sum(r["bytes_sent"] for r in ranks) / n,
        "cache_mb": s["cache_bytes"] / 1e6,
        "stall_s": s["stall_s"],
        "wall_s": wall,
        "peak_mb": [c["max_usage_gb"] * 1e3 for c in counters],
        "failcnt": [c["failcnt"] for c in counters],
        "oom_kill": sum(c["oom_kill"] for c in counters),
        "ranks": [
            {
                k: r[k]
                for k in ("rank", "layers", "cache_bytes", "hit_rate", "mb_read", "net_wait_s", "bytes_sent")
            }
            for r in ranks
        ],
    }


def median_run(rs: list[dict]) -> dict:
    return sorted(rs, key=lambda r: r["tps"])[(len(rs) - 1) // 2]


def describe(r: dict) -> str:
    text = (f"{r['tps']:.3f} tok/s, hit rate {r['hit_rate']:.3f}, {r['mb_per_token']:.1f} MB read/tok "
            f"(disk {r['disk_mb_per_token']:.1f}), wire {r['wire_bytes_per_token'] / 1e3:.1f} kB/tok, "
            f"cache {r['cache_mb']:.0f} MB, stall {r['stall_s']:.1f} s, wall {r['wall_s']:.0f} s, peak "
            f"{'+'.join(f'{p:.0f}' for p in r['peak_mb'])} MB, oom_kill {r['oom_kill']}")  # fmt: skip
    for k in r["ranks"]:
        text += (f"; rank {k['rank']} layers {k['layers'][0]}-{k['layers'][1]}: cache "
                 f"{k['cache_bytes'] / 1e6:.0f} MB, hit {k['hit_rate']:.3f}, {k['mb_read'] / r['n']:.1f} MB read/tok, "
                 f"net wait {k['net_wait_s']:.1f} s")  # fmt: skip
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument(
        "--share", type=float, default=0.25, help="each small group, as a share of the checkpoint"
    )
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the three configurations")
    ap.add_argument(
        "--flags", default="", help="extra runtime flags for every run (default: none = defaults)"
    )
    ap.add_argument(
        "--control-rounds", type=int, default=1,
        help="rounds of the control (one process vs two ranks, every expert cached, no group): the pipeline's "
        "own cost on this machine with no reads at all; 0 = skip",
    )  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", type=Path, default=Path("scratch/p8"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.access(CGROUP_ROOT, os.W_OK):
        sys.exit("P8 needs root and a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    if not (BIN / "mlx.launch").exists():
        sys.exit("P8 needs mlx.launch (installed with mlx)")
    src, packed = build(args.work, args.layers)
    src_bytes = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    limits = {"25": int(src_bytes * args.share), "50": int(src_bytes * 2 * args.share)}
    gen_args = ["generate", str(packed), "--prompt-ids", PROMPT, "-n", str(args.tokens), "--json",
                *args.flags.split()]  # fmt: skip
    print(f"checkpoint {src_bytes / 1e9:.3f} GB ({args.layers} layers); groups {limits['25'] / 1e9:.3f} GB "
          f"({args.share:.0%}) and {limits['50'] / 1e9:.3f} GB ({2 * args.share:.0%}); flags: "
          f"{args.flags or 'defaults'}", flush=True)  # fmt: skip
    config_json = json.loads((src / "config.json").read_text())
    hidden = config_json.get("text_config", config_json)["hidden_size"]
    load_before = load_note()
    pings = [round_trip_ms(hidden)]
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS + CONTROLS}
    try:
        for i in range(args.rounds):
            for config in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
                r = run_config(config, packed, limits, gen_args, args.timeout)
                runs[config].append(r)
                print(f"round {i + 1} {LABELS[config]}: {describe(r)}; {load_note()}", flush=True)
        for i in range(args.control_rounds):
            for config in CONTROLS if i % 2 == 0 else CONTROLS[::-1]:
                cache = int(median_run(runs["one-50"])["cache_mb"] * 1e6)
                r = run_config(config, packed, limits, gen_args, args.timeout, cache)
                runs[config].append(r)
                print(f"control {i + 1} {LABELS[config]}: {describe(r)}; {load_note()}", flush=True)
    finally:
        for name in ("single", "rank0", "rank1"):  # a failed run may leave its groups behind
            group = MemoryGroup(f"{PREFIX}{name}", 0)
            if group.path.exists():
                group.remove()
    pings.append(round_trip_ms(hidden))
    load = f"{load_before} before, {load_note()} after"
    print(
        f"loopback round trip of one decode step's messages: {pings[0][0]:.2f} ms before, {pings[1][0]:.2f} ms "
        f"after; a rank waiting in recv uses {pings[0][1]:.2f} / {pings[1][1]:.2f} cores"
    )

    all_tokens = [r["tokens"] for rs in runs.values() for r in rs]
    same = all(t == all_tokens[0] for t in all_tokens)
    print(f"greedy tokens identical across all {len(all_tokens)} runs: {same}")

    m = {c: median_run(runs[c]) for c in CONFIGS}
    vs50 = m["two-25"]["tps"] / m["one-50"]["tps"]
    vs25 = m["two-25"]["tps"] / m["one-25"]["tps"]
    control = ""
    if args.control_rounds:
        c1, c2 = median_run(runs["one-free"]), median_run(runs["two-free"])
        control = (f"control, no group and the 50 % process's cache {c1['cache_mb']:.0f} MB (two ranks: half each; "
                   f"the page cache unbounded; median of {args.control_rounds}): one process "
                   f"{c1['tps']:.3f} tok/s, two ranks {c2['tps']:.3f} tok/s, ratio {c2['tps'] / c1['tps']:.3f} "
                   "(the pipeline's own cost on this 2-core machine)")  # fmt: skip
        print(control)
    print(
        f"P8 two 25 % ranks ÷ one 50 % process: {vs50:.3f} (goal >= 0.9: {'met' if vs50 >= 0.9 else 'not met'})"
    )
    print(
        f"P8 two 25 % ranks ÷ one 25 % process: {vs25:.3f} (goal >= 1.5: {'met' if vs25 >= 1.5 else 'not met'})"
    )
    flags = args.flags or "default flags (buffered I/O, default cache from each group's limit)"
    rows = []
    for c in CONFIGS:
        r = m[c]
        config = (f"P8 issue15 geometry {args.layers}L (hidden 1024, 128 x top-8, inter 512, 4-bit, bf16 layout, "
                  f"{src_bytes / 1e9:.2f} GB), {LABELS[c]}: memory cgroup {limits['50' if c == 'one-50' else '25'] / 1e9:.2f} GB"
                  f"{' per rank' if c == 'two-25' else ''}, {flags}, greedy {args.tokens} tokens")  # fmt: skip
        each = ", ".join(f"{x['tps']:.3f}" for x in runs[c])
        note = f"{describe(r)}; tok/s of each run {each} (median of {args.rounds} alternated)"
        if c == "two-25":
            note += (f"; ÷ one process in 25 %: {vs25:.3f} (goal >= 1.5), ÷ 50 %: {vs50:.3f} (goal >= 0.9); a decode "
                     f"step sends 2 x (20 + {4 * hidden}) B (header + float32 hidden state each way), the rest is "
                     f"prefill and stats; loopback round trip of those messages {pings[0][0]:.2f} / {pings[1][0]:.2f} ms, "
                     f"a rank waiting in recv uses {pings[0][1]:.2f} / {pings[1][1]:.2f} cores (before / after)")  # fmt: skip
            note += f"; {control}" if control else ""
        note += f"; greedy tokens identical in all {len(all_tokens)} runs: {'yes' if same else 'NO'}; {load}"
        rows.append(row(config, "P8 decode tok/s (ratio: ÷ one process in 50 %)", r["tps"],
                        r["tps"] / m["one-50"]["tps"], note))  # fmt: skip
    if not args.no_record:
        append_results(rows)
    if not same:
        sys.exit("greedy tokens differ between runs")


if __name__ == "__main__":
    main()
