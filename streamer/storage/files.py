"""Exact, bounded file I/O shared by the packed format, repack and sessions: scatter reads, full writes,
atomic replacement, checksums.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

CHUNK_BYTES = 4 << 20  # whole-file passes read this much, then checksum it while it is still in cache


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


Progress = Callable[[int], None]  # called with bytes just processed


def read_into(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Fills byte memoryviews ``bufs`` in order from ``fd`` at ``offset``; returns bytes read."""
    pending = [b for b in bufs if len(b)]
    total = 0
    while pending:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, pending[:_IOV_MAX], offset + total)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(pending[0]), offset + total)
            pending[0][: len(data)] = data
            n = len(data)
        if n == 0:
            break
        total += n
        i = 0
        while i < len(pending) and n >= len(pending[i]):
            n -= len(pending[i])
            i += 1
        pending = pending[i:]
        if n:
            pending[0] = pending[0][n:]
    return total


def write_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``path`` so that it either has its old content or all of ``data``, even across a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc32_file(path: Path, progress: Progress | None = None) -> int:
    crc, buf = 0, bytearray(min(CHUNK_BYTES, max(path.stat().st_size, 1)))
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
            if progress:
                progress(n)
    return crc
