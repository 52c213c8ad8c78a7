"""How many bytes the expert cache gets: from --cache-gb / --cache-experts, or derived from the memory
this process may use (physical RAM or its cgroup's limit).
"""

from __future__ import annotations

from streamer.experts.runtime import block_shape_of
from streamer.models.args import ModelArgs
from streamer.models.load import _resolve_dtype

# Memory left to the OS, the page cache's working set and activations when the budget is derived:
# RAM × (1 − RAM_SHARE) plus this much, or less on small machines (see ``headroom_bytes``).
HEADROOM_BYTES = 4 << 30
# The least extra headroom kept however small the limit: the interpreter, MLX, numpy and the tokenizer,
# KV cache and activations of a small model, reader staging buffers.
MIN_HEADROOM_BYTES = 128 << 20


# The fraction of RAM streamer allows itself when no budget is given.
RAM_SHARE = 0.75


def total_ram_bytes() -> int:
    """Memory this process may use: physical RAM, or its own memory cgroup's limit if lower (Linux)."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in _cgroup_limit_files():
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def _cgroup_limit_files(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[str]:
    """The memory limit files of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``): a limit set on any of them applies."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = f"{root}/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        files += [
            f"{base}/{'/'.join(parts[:i])}/{name}".replace("//", "/") for i in range(len(parts), -1, -1)
        ]
    return files


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
