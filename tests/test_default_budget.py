"""The default expert cache uses the memory it is given, also on small machines and in memory cgroups.

A flat 4 GB headroom made the default collapse to the minimum cache under a few GB (issue: a 456 MB
cgroup peaked at 175 MB); ``headroom_bytes`` scales it. The cgroup test decodes inside a real memory
cgroup (v1, root only; skipped elsewhere) with no cache flags and checks that the default cache is more
than the minimum, and that the process peaks under the limit and is never OOM-killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.experts.budget import HEADROOM_BYTES, MIN_HEADROOM_BYTES, RAM_SHARE, default_cache_bytes
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate
from tests.test_memory_bound import BIG_EXPERTS

MB, GB = 10**6, 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
LIMIT_BYTES = 456 * MB


def test_large_machines_keep_the_old_default():
    for ram in (16 * GB, 64 * GB, 512 * GB):
        want = int(ram * RAM_SHARE) - 3 * GB - HEADROOM_BYTES
        assert default_cache_bytes(3 * GB, 10**15, ram) == want


def test_small_limits_scale_the_headroom():
    resident = 40 * MB
    got = default_cache_bytes(resident, 10**15, LIMIT_BYTES)
    assert got == int(LIMIT_BYTES * RAM_SHARE) - resident - MIN_HEADROOM_BYTES  # 174 MB, was 0
    assert default_cache_bytes(resident, 10**15, 8 * GB) == 6 * GB - resident - 2 * GB
    assert default_cache_bytes(resident, 50 * MB, LIMIT_BYTES) == 50 * MB  # never more than all experts


PROBE = """
import json, sys
from streamer.experts.budget import minimum_cache_bytes, total_ram_bytes
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine

engine = load_engine(sys.argv[1])
sampler = make_sampler(SamplingParams())
stream = stream_generate(engine.model, engine.tokenizer, list(range(3, 20)), sampler, 8)
tokens = sum(1 for _ in stream)
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"tokens": tokens, "hwm": hwm, "ram": total_ram_bytes(),
                  "cache_bytes": engine.runtime.cache.capacity_bytes,
                  "minimum": minimum_cache_bytes(engine.runtime.packed, engine.args),
                  "stats": engine.stats()}))
"""


def _cgroup_available() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and os.access(CGROUP_ROOT, os.W_OK)


@pytest.mark.skipif(not _cgroup_available(), reason="needs root and a cgroup v1 memory hierarchy")
def test_decode_in_a_small_memory_cgroup_uses_it_without_oom(tmp_path):
    src = generate(tmp_path / "src", BIG_EXPERTS)
    run_repack(make_plan(src, tmp_path / "packed"))
    group = CGROUP_ROOT / f"streamer-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
        try:
            (group / "memory.memsw.limit_in_bytes").write_text(str(LIMIT_BYTES))
        except OSError:
            pass
        run = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path / "packed")],
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            capture_output=True,
            text=True,
            timeout=600,
        )
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert int(oom.get("oom_kill", 0)) == 0 and run.returncode == 0, (run.returncode, run.stderr[-2000:])
    r = json.loads(run.stdout.strip().splitlines()[-1])
    report = {k: v / MB if isinstance(v, int) else v for k, v in r.items() if k != "stats"} | {
        "max_usage_MB": max_usage / MB
    }
    assert abs(r["ram"] - LIMIT_BYTES) < 1 << 16 and r["tokens"] == 8, report  # the kernel rounds to pages
    assert r["hwm"] < LIMIT_BYTES, report
    assert r["cache_bytes"] >= 4 * r["minimum"], report  # the default used the memory, not the minimum
    assert max_usage <= LIMIT_BYTES, report
