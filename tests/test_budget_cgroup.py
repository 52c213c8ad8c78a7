"""The default cache budget reads this process's memory cgroup (Linux), from fake /proc and /sys trees.

Each test writes a small tree under tmp_path — proc/self/cgroup, proc/self/mountinfo and the cgroup files —
and passes it as ``root``: the lowest limit on the process's group or an ancestor wins, "max" and v1's
PAGE_COUNTER_MAX mean no limit, and a group the kernel mounts elsewhere (cgroup v2 beside v1, a container's
own group as the mount's top) is found through mountinfo. tests/test_default_budget.py runs a real cgroup.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streamer.experts import budget
from streamer.experts.budget import (
    RAM_SHARE,
    cgroup_memory_limit,
    default_cache_bytes,
    headroom_bytes,
    physical_ram_bytes,
    total_ram_bytes,
)

GB = 1 << 30
V1_UNLIMITED = "9223372036854771712"  # PAGE_COUNTER_MAX × 4 KiB: what an unlimited v1 group reports

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = (
    "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
)


def tree(root: Path, cgroup: str, mountinfo: str | None, files: dict[str, str]) -> str:
    """Writes proc/self/cgroup, proc/self/mountinfo (unless None) and ``files`` (paths under root)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return str(root)


def test_v1_group_limit_is_the_ram(tmp_path):
    root = tree(tmp_path, "5:cpu:/other\n4:memory:/bench/p8_rank1\n0::/\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/bench/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/bench/p8_rank1/memory.limit_in_bytes": str(GB),
        "sys/fs/cgroup/cpu/other/memory.limit_in_bytes": "1",  # another controller's hierarchy: ignored
        "sys/fs/cgroup/unified/memory.max": "max",
    })  # fmt: skip
    assert cgroup_memory_limit(root) == GB
    assert total_ram_bytes(root) == min(physical_ram_bytes(), GB)


def test_an_ancestors_lower_limit_applies(tmp_path):
    root = tree(tmp_path, "4:memory:/slice/job\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/memory/slice/memory.limit_in_bytes": str(GB // 2),
        "sys/fs/cgroup/memory/slice/job/memory.limit_in_bytes": str(GB),
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
    })  # fmt: skip
    assert cgroup_memory_limit(root) == GB // 2


def test_v2_memory_max_and_max_meaning_none(tmp_path):
    root = tree(tmp_path, "0::/user.slice/run-1.scope\n", V2_MOUNTS, {
        "sys/fs/cgroup/user.slice/run-1.scope/memory.max": "max",
        "sys/fs/cgroup/user.slice/memory.max": str(3 * GB),
    })  # fmt: skip
    assert cgroup_memory_limit(root) == 3 * GB


def test_v2_beside_v1_is_found_through_mountinfo(tmp_path):
    root = tree(tmp_path, "4:memory:/\n0::/job\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/unified/job/memory.max": str(2 * GB),
    })  # fmt: skip
    assert cgroup_memory_limit(root) == 2 * GB


@pytest.mark.parametrize("value", ["max", V1_UNLIMITED, str(1 << 62), "garbage", ""])
def test_no_limit_is_physical_ram(tmp_path, value):
    root = tree(tmp_path, "4:memory:/a\n0::/a\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/memory/a/memory.limit_in_bytes": value,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/unified/a/memory.max": value,
        "sys/fs/cgroup/unified/memory.max": "max",
    })  # fmt: skip
    assert cgroup_memory_limit(root) is None
    assert total_ram_bytes(root) == physical_ram_bytes()


def test_no_cgroup_files_at_all(tmp_path):
    assert cgroup_memory_limit(str(tmp_path)) is None
    assert total_ram_bytes(str(tmp_path)) == physical_ram_bytes()


def test_a_container_sees_its_own_group_as_the_mount_top(tmp_path):
    # Docker without a cgroup namespace: /proc says /docker/abc, and that group is mounted at the top.
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
    root = tree(tmp_path, "4:memory:/docker/abc\n", mounts, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(6 * GB),
    })  # fmt: skip
    assert cgroup_memory_limit(root) == 6 * GB
    # A group inside the container: /docker/abc/rank1 is rank1 under the mount.
    inner = tree(tmp_path / "inner", "4:memory:/docker/abc/rank1\n", mounts, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/rank1/memory.limit_in_bytes": str(GB),
    })  # fmt: skip
    assert cgroup_memory_limit(inner) == GB
    # With a cgroup namespace /proc says "/" relative to the namespace: the same file.
    other = tree(tmp_path / "ns", "4:memory:/\n", mounts, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(5 * GB),
    })  # fmt: skip
    assert cgroup_memory_limit(other) == 5 * GB


def test_v1_hierarchical_limit_counts_ancestors_the_process_cannot_see(tmp_path):
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    root = tree(tmp_path, "4:memory:/docker/abc\n", mounts, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/memory.stat": f"cache 0\nrss 0\nhierarchical_memory_limit {GB}\n"
                                            f"hierarchical_memsw_limit {V1_UNLIMITED}",
    })  # fmt: skip
    assert cgroup_memory_limit(root) == GB


def test_without_mountinfo_the_usual_places_are_read(tmp_path):
    root = tree(tmp_path, "4:memory:/a\n", None, {"sys/fs/cgroup/memory/a/memory.limit_in_bytes": str(GB)})
    assert cgroup_memory_limit(root) == GB


def test_macos_is_physical_ram(tmp_path, monkeypatch):
    root = tree(
        tmp_path, "4:memory:/a\n", HYBRID_MOUNTS, {"sys/fs/cgroup/memory/a/memory.limit_in_bytes": "1"}
    )
    monkeypatch.setattr(sys, "platform", "darwin")
    assert total_ram_bytes(root) == physical_ram_bytes()


def test_default_budget_follows_the_cgroup(tmp_path, monkeypatch):
    """The default budget (what --cache-gb defaults to, per rank under mlx.launch) uses the group's limit."""
    limit = 2 * GB
    root = tree(tmp_path, "4:memory:/rank1\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/memory/rank1/memory.limit_in_bytes": str(limit),
    })  # fmt: skip
    monkeypatch.setattr(budget, "total_ram_bytes", lambda: total_ram_bytes(root))
    resident = 100 << 20
    want = int(limit * RAM_SHARE) - resident - headroom_bytes(limit)
    assert default_cache_bytes(resident, 10**15) == want
