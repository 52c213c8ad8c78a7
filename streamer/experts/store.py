"""ExpertStore: reads one expert block from a packed model straight into a caller's buffers. Bytes only.

Two I/O modes, a config value rather than a code fork:
- ``buffered``: plain ``preadv`` through the OS page cache, scattering the block's components directly
  into the slot buffers (padding between components lands in a scratch buffer);
- ``direct``: bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS) so the expert cache is the
  only cache; O_DIRECT needs aligned memory, so the block is read into a page-aligned per-thread
  staging buffer and copied into the slot.

Safe to call from several threads at once: reads are positional and staging buffers are per thread.

With ``verify`` (``--verify-reads``, off by default) every component read is checked against the
manifest's CRC-32 (formats/PACKED.md §4) on the reader thread, before the slot is published: a damaged
copy fails its request naming file, layer, expert and component instead of silently answering wrong.
Cost, measured by benchmarks/bench_verify_reads.py: ``settings.RuntimeConfig.verify_reads``.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import zlib
from collections.abc import Callable, Sequence

from streamer.errors import PackedFormatError, StreamerError
from streamer.storage.files import read_into
from streamer.storage.packed import PackedModel, repair_hint
from streamer.storage.packed_format import LayerEntry

IO_MODES = ("buffered", "direct")  # --io: through the page cache, or around it
_DIRECT_ALIGN = 4096
_F_NOCACHE = 48  # macOS fcntl command; not exposed by Python's fcntl module


class ExpertReadError(StreamerError):
    """Reading an expert block failed (I/O error, short read): names the file, layer and expert."""


class ExpertReadTimeout(ExpertReadError):
    """An expert read did not finish within the I/O timeout (a stalled or detached disk)."""


class ExpertChecksumError(ExpertReadError):
    """An expert block's bytes do not match the manifest's CRC-32: the packed copy is damaged."""


class ExpertStore:
    """Positional reads of expert blocks of one packed model.

    Args:
        packed: an opened packed model (its manifest gives every layer's block layout).
        io_mode: "buffered" or "direct".
        verify: check each component read against the manifest's CRC-32 (``--verify-reads``).
        fault: test hook called as ``fault(layer, expert)`` before every read (may raise or sleep).
        layers: the layers whose files to open (a pipeline stage); None = every layer.
    """

    def __init__(
        self,
        packed: PackedModel,
        io_mode: str = "buffered",
        fault: Callable | None = None,
        verify: bool = True,
        layers: Sequence[int] | None = None,
    ):
        if io_mode not in IO_MODES:
            raise ValueError(f"io mode must be one of {', '.join(IO_MODES)}, got {io_mode!r}")
        self.packed = packed
        self.io_mode = io_mode
        self.fault = fault
        self.verify = verify
        self._local = threading.local()
        entries = packed.manifest.layers if layers is None else [packed.manifest.layers[i] for i in layers]
        self._fds = {entry.layer: self._open(packed.path / entry.file) for entry in entries}
        self._scratch = bytearray(max(_max_gap(e) for e in entries) or 1)

    def _open(self, path) -> int:
        flags = os.O_RDONLY
        if self.io_mode == "direct" and sys.platform.startswith("linux"):
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if self.io_mode == "direct" and e.errno == 22:  # EINVAL: the filesystem refuses O_DIRECT
                raise PackedFormatError(
                    f"{path}: this filesystem does not support direct I/O; use --io buffered"
                ) from None
            raise PackedFormatError(f"{path}: cannot open ({e.strerror})") from None
        if self.io_mode == "direct" and sys.platform == "darwin":  # pragma: no cover - macOS only
            import fcntl

            fcntl.fcntl(fd, _F_NOCACHE, 1)
        return fd

    def read_block(self, layer: int, expert: int, buffers: Sequence[memoryview]) -> int:
        """Reads (layer, expert) into ``buffers``: one byte buffer per component, in block order.

        Returns:
            Bytes read from the file.

        Raises:
            ExpertReadError: on an I/O error or a short read. ExpertChecksumError: (with ``verify``)
                a component's bytes differ from the manifest's CRC-32.
        """
        entry = self.packed.manifest.layers[layer]
        offset = entry.block_offset(expert)
        try:
            if self.fault is not None:
                self.fault(layer, expert)
            if self.io_mode == "direct":
                n = self._read_direct(entry, layer, offset, buffers)
            else:
                n = self._read_buffered(entry, layer, offset, buffers)
        except OSError as e:
            raise ExpertReadError(
                f"{self.packed.path / entry.file}: reading layer {layer} expert {expert} failed: "
                f"{e.strerror or e}"
            ) from e
        if self.verify:
            self._check(entry, expert, buffers)
        return n

    def _check(self, entry: LayerEntry, expert: int, buffers: Sequence[memoryview]) -> None:
        """Compares each component read with the manifest's CRC-32 (zlib releases the GIL meanwhile)."""
        for c, buf, want in zip(entry.components, buffers, entry.crc32[expert], strict=True):
            got = zlib.crc32(buf)
            if got != want:
                path, manifest = self.packed.path, self.packed.manifest
                raise ExpertChecksumError(
                    f"{path / entry.file}: layer {entry.layer} expert {expert} component {c.name}: "
                    f"checksum mismatch (manifest {want:08x}, read {got:08x}): the packed copy is damaged; "
                    f"{repair_hint(path, manifest)} (`streamer verify {path}` re-checks every byte)"
                )

    def _read_buffered(self, entry: LayerEntry, layer: int, offset: int, buffers) -> int:
        iov, pos = [], 0
        for c, buf in zip(entry.components, buffers, strict=True):
            if c.offset > pos:
                iov.append(memoryview(self._scratch)[: c.offset - pos])  # padding, discarded
            iov.append(buf)
            pos = c.offset + c.nbytes
        n = read_into(self._fds[layer], iov, offset)
        if n != pos:
            raise OSError(5, f"short read ({n} of {pos} bytes; file truncated?)")
        return n

    def _read_direct(self, entry: LayerEntry, layer: int, offset: int, buffers) -> int:
        staging = self._staging(entry.block_bytes)
        n = read_into(self._fds[layer], [staging[: entry.block_bytes]], offset)
        if n != entry.block_bytes:
            raise OSError(5, f"short read ({n} of {entry.block_bytes} bytes; file truncated?)")
        for c, buf in zip(entry.components, buffers, strict=True):
            buf[:] = staging[c.offset : c.offset + c.nbytes]
        return n

    def _staging(self, nbytes: int) -> memoryview:
        # mmap memory is page aligned, as O_DIRECT requires; one buffer per reader thread.
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            size = -(-nbytes // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._local.buf = buf = mmap.mmap(-1, size)
        return memoryview(buf)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _max_gap(entry: LayerEntry) -> int:
    return max((end - start for start, end in entry.padding()), default=0)
