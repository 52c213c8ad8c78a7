"""How many bytes the expert cache gets: from --cache-gb / --cache-experts, or derived from the memory
this process may use (physical RAM, or on Linux its memory cgroup's limit when that is lower).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from streamer.experts.runtime import block_shape_of
from streamer.models.args import ModelArgs
from streamer.models.load import _resolve_dtype

# Memory left to the OS, the page cache's working set and activations when the budget is derived:
# RAM × (1 − RAM_SHARE) plus this much, or less on small machines (see ``headroom_bytes``).
HEADROOM_BYTES = 4 << 30
# The least extra headroom kept however small the limit: the interpreter, MLX, numpy and the tokenizer,
# KV cache and activations of a small model, reader staging buffers.
MIN_HEADROOM_BYTES = 128 << 20
# A cgroup limit this large means "no limit": v1 writes PAGE_COUNTER_MAX pages (9223372036854771712 with
# 4 KiB pages), v2 writes "max".
NO_LIMIT_BYTES = 1 << 60


# The fraction of RAM streamer allows itself when no budget is given.
RAM_SHARE = 0.75


def physical_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_ram_bytes(root: str = "/") -> int:
    """Memory this process may use: physical RAM, or on Linux its memory cgroup's limit if lower.

    Under ``mlx.launch`` every rank runs this for itself, so a rank started in a smaller cgroup (a
    container, a systemd slice, ``systemd-run -p MemoryMax=``) sizes its cache from that, not from the
    machine. ``root`` is where /proc and /sys are found (tests pass a fake tree).
    """
    ram = physical_ram_bytes()
    if sys.platform != "linux":
        return ram
    limit = cgroup_memory_limit(root)
    return ram if limit is None else min(ram, limit)


def cgroup_memory_limit(root: str = "/") -> int | None:
    """The lowest memory limit set on this process's cgroup or an ancestor (v1 and v2), or None.

    The cgroup paths come from ``/proc/self/cgroup``, where each hierarchy is mounted from
    ``/proc/self/mountinfo`` (v2 at /sys/fs/cgroup, or /sys/fs/cgroup/unified beside v1; a container's own
    group mounted as the hierarchy's top). v1 also reports ``hierarchical_memory_limit`` in memory.stat,
    which counts ancestors a container cannot see. "max" and PAGE_COUNTER_MAX mean no limit.
    """
    base = Path(root)
    mounts = _cgroup_mounts(base / "proc/self/mountinfo", root)
    proc_cgroup = str(base / "proc/self/cgroup")
    limits = [_read_limit(f) for f in _cgroup_limit_files(proc_cgroup, str(base / "sys/fs/cgroup"), mounts)]
    limits += [_read_stat_limit(f) for f in _v1_stat_files(proc_cgroup, mounts)]
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def _cgroup_mounts(mountinfo: Path, root: str = "/") -> dict[str, list[tuple[str, str]]] | None:
    """{"v1": [(mount root, mount point)] of the memory controller, "v2": [...] of cgroup2}, mount points
    under ``root``; None if mountinfo cannot be read (then the usual places are assumed)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    mounts: dict[str, list[tuple[str, str]]] = {"v1": [], "v2": []}
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], after[2] if len(after) > 2 else ""
        point = str(Path(root) / fields[4].lstrip("/"))
        if fstype == "cgroup2":
            mounts["v2"].append((fields[3], point))
        elif fstype == "cgroup" and "memory" in options.split(","):
            mounts["v1"].append((fields[3], point))
    return mounts


def _cgroup_limit_files(
    proc_cgroup: str = "/proc/self/cgroup",
    root: str = "/sys/fs/cgroup",
    mounts: dict[str, list[tuple[str, str]]] | None = None,
) -> list[str]:
    """The memory limit files of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), deepest first: a limit set on any of them applies.

    ``mounts`` (from ``_cgroup_mounts``): where each hierarchy is mounted and which of its groups the
    mount shows; without it v1 is taken to be at ``root``/memory and v2 at ``root`` (or ``root``/unified).
    """
    if mounts is None:
        mounts = {"v1": [("/", f"{root}/memory")], "v2": [("/", root), ("/", f"{root}/unified")]}
    files = []
    for version, path in _memory_paths(proc_cgroup):
        name = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        for mount_root, point in mounts[version]:
            for group in _groups_under(path, mount_root, point):
                files.append(f"{group}/{name}")
    return files


def _v1_stat_files(proc_cgroup: str, mounts: dict | None) -> list[str]:
    """memory.stat of this process's own v1 group (its ``hierarchical_memory_limit``)."""
    if mounts is None:
        return []
    return [
        f"{_groups_under(path, mount_root, point)[0]}/memory.stat"
        for version, path in _memory_paths(proc_cgroup)
        if version == "v1"
        for mount_root, point in mounts["v1"]
    ]


def _memory_paths(proc_cgroup: str) -> list[tuple[str, str]]:
    """("v1" | "v2", cgroup path) of the memory controller's lines of /proc/self/cgroup."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            out.append(("v2", path))
        elif "memory" in controllers.split(","):
            out.append(("v1", path))
    return out


def _groups_under(path: str, mount_root: str, point: str) -> list[str]:
    """The directories of group ``path`` and its ancestors as seen under a mount of ``mount_root`` at
    ``point``, deepest first, never above the mount point."""
    mount_root = "/" + mount_root.strip("/")
    path = "/" + path.strip("/")
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]  # a container's own group mounted as the top
    parts = [p for p in path.split("/") if p]
    point = point.rstrip("/")
    return [f"{point}/{'/'.join(parts[:i])}".rstrip("/") for i in range(len(parts), -1, -1)]


def _read_limit(file: str) -> int | None:
    try:
        with open(file) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= NO_LIMIT_BYTES:  # "max" (v2), PAGE_COUNTER_MAX (v1)
        return None
    return int(text)


def _read_stat_limit(file: str) -> int | None:
    try:
        with open(file) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "hierarchical_memory_limit" and value.strip().isdigit():
                    n = int(value)
                    return n if n < NO_LIMIT_BYTES else None
    except OSError:
        pass
    return None


def headroom_bytes(ram_bytes: int) -> int:
    """Extra memory kept free beyond RAM × (1 − RAM_SHARE): 4 GB from 16 GB of RAM up, 25 % of RAM
    below that, never under MIN_HEADROOM_BYTES.

    A flat 4 GB made the default collapse to the minimum cache on small machines and in cgroups (a
    456 MB limit left nothing and peaked at 175 MB of the 456 allowed); scaled, a 456 MB limit keeps
    114 + 128 MB free and gives the cache the rest.
    """
    return min(HEADROOM_BYTES, max(MIN_HEADROOM_BYTES, int(ram_bytes * (1 - RAM_SHARE))))


def default_cache_bytes(resident_bytes: int, expert_bytes: int, ram_bytes: int | None = None) -> int:
    """The expert cache budget when the user gives none (``expert_bytes``: all experts as held in slots).

    ``RAM × 0.75 − resident weights − headroom`` (KV cache, DeltaNet state, activations, the OS; see
    ``headroom_bytes``), never more than all experts. The caller raises it to the minimum (one layer's
    top-k) if needed.
    """
    ram = total_ram_bytes() if ram_bytes is None else ram_bytes
    return max(0, min(expert_bytes, int(ram * RAM_SHARE) - resident_bytes - headroom_bytes(ram)))


def cache_budget(
    packed, args: ModelArgs, cache_bytes: int | None, cache_experts: int | None, dtype: str | None
) -> int:
    """Bytes for expert slots from --cache-gb (``cache_bytes``), --cache-experts or the RAM-derived default.

    Sizes are slots in memory (floats widened to the activation dtype's promotion, see expert_cache),
    which can exceed the blocks on disk: --cache-experts N buys N experts whatever that costs.
    """
    layers = packed.manifest.layers
    if cache_bytes is not None:
        return cache_bytes
    dtype = _resolve_dtype(dtype)
    slot_bytes = [block_shape_of(e, dtype).nbytes for e in layers]
    if cache_experts is not None:
        mean = sum(b * e.num_experts for b, e in zip(slot_bytes, layers, strict=True)) / sum(
            e.num_experts for e in layers
        )
        return int(cache_experts * mean)
    all_slots = sum(b * e.num_experts for b, e in zip(slot_bytes, layers, strict=True))
    return max(
        minimum_cache_bytes(packed, args, dtype),
        default_cache_bytes(packed.manifest.resident_bytes, all_slots),
    )


def minimum_cache_bytes(packed, args: ModelArgs, dtype=None) -> int:
    """The smallest workable budget: one layer's top-k in every slot pool (slots as held for ``dtype``)."""
    return args.num_experts_per_tok * sum({block_shape_of(e, dtype).nbytes for e in packed.manifest.layers})
