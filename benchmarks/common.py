"""What every benchmark script shares: the results file, machine/commit labels, cache dropping."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results.tsv"
COLUMNS = ["date", "commit", "machine", "config", "metric", "value", "ratio", "note"]


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return f"{platform.system()}-{platform.machine()}-{os.cpu_count()}cpu"


def row(config: str, metric: str, value: float, ratio: float | str = "", note: str = "") -> list[str]:
    ratio_text = f"{ratio:.3f}" if isinstance(ratio, float) else str(ratio)
    return [
        datetime.date.today().isoformat(),
        commit(),
        machine(),
        config,
        metric,
        f"{value:.4g}",
        ratio_text,
        note,
    ]


def append_results(rows: list[list[str]]) -> None:
    """Appends rows to benchmarks/results.tsv (writing the header first if the file is new)."""
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")


def drop_caches() -> bool:
    """Empties the OS page cache (root only) so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False
