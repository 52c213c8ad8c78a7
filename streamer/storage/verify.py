"""Verification of a packed model: re-read every byte and compare checksums. Repack runs the same code on
each layer it writes.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from streamer.errors import PackedFormatError
from streamer.storage.files import CHUNK_BYTES, Progress, crc32_file, read_into
from streamer.storage.packed import (
    _check_size,
    _read_resident_header,
    check_packed_files,
    read_manifest,
    repair_hint,
)
from streamer.storage.packed_format import (
    MANIFEST_FILE,
    RESIDENT_FILE,
    LayerEntry,
    Manifest,
    check_layer_header,
    describe_layers,
)


def verify_layer_file(file: Path, entry: LayerEntry, progress: Progress | None = None) -> None:
    """Checks a layer file's size, header, every component's CRC-32 and that padding is zero.

    Raises:
        PackedFormatError: naming the file, layer, expert and component of the first mismatch.
    """
    import numpy as np

    _check_size(file, entry.file_bytes)
    B, where = entry.block_bytes, f"{file}: layer {entry.layer}"
    per = max(1, min(CHUNK_BYTES // B, 256))
    buf = bytearray(per * B)
    mv, blocks = memoryview(buf), np.frombuffer(buf, np.uint8).reshape(per, B)
    fd = os.open(file, os.O_RDONLY)
    try:
        check_layer_header(os.pread(fd, entry.data_offset, 0), entry, file)
        for e0 in range(0, entry.num_experts, per):
            n = min(per, entry.num_experts - e0)
            if read_into(fd, [mv[: n * B]], entry.block_offset(e0)) != n * B:
                raise PackedFormatError(f"{where}: short read at expert {e0} (file changed while reading?)")
            bad_padding = np.zeros(n, bool)
            for a, b in entry.padding():
                bad_padding |= blocks[:n, a:b].any(axis=1)
            for j in range(n):
                for c, want in zip(entry.components, entry.crc32[e0 + j], strict=True):
                    got = zlib.crc32(mv[j * B + c.offset : j * B + c.offset + c.nbytes])
                    if got != want:
                        raise PackedFormatError(
                            f"{where} expert {e0 + j} component {c.name}: checksum mismatch "
                            f"(manifest {want:08x}, file {got:08x})"
                        )
                if bad_padding[j]:
                    raise PackedFormatError(f"{where} expert {e0 + j}: non-zero bytes in block padding")
            if progress:
                progress(n * B)
    finally:
        os.close(fd)


def verify_resident_file(
    file: Path, expected_bytes: int, crcs: dict[str, int], progress: Progress | None = None
):
    """Checks resident.safetensors: size, header, and each tensor's CRC-32 (naming the first bad one)."""
    _check_size(file, expected_bytes)
    tensors = _read_resident_header(file)
    if set(tensors) != set(crcs):
        diff = sorted(set(tensors) ^ set(crcs))
        raise PackedFormatError(f"{file}: tensors differ from the manifest (e.g. '{diff[0]}')")
    buf = memoryview(bytearray(CHUNK_BYTES))
    fd = os.open(file, os.O_RDONLY)
    try:
        for name in sorted(tensors, key=lambda n: tensors[n].offset):
            t, crc, done = tensors[name], 0, 0
            while done < t.nbytes:
                n = min(len(buf), t.nbytes - done)
                if read_into(fd, [buf[:n]], t.offset + done) != n:
                    raise PackedFormatError(f"{file}: short read in tensor '{name}'")
                crc = zlib.crc32(buf[:n], crc)
                done += n
                if progress:
                    progress(n)
            if crc != crcs[name]:
                raise PackedFormatError(
                    f"{file}: resident tensor '{name}': checksum mismatch (manifest {crcs[name]:08x}, "
                    f"file {crc:08x})"
                )
    finally:
        os.close(fd)


def packed_checks(
    path: Path, m: Manifest, progress: Progress | None = None, layers: Sequence[LayerEntry] | None = None
) -> list[tuple[str | int, Path, Callable[[], None]]]:
    """Every check of a packed copy, in the order verify runs them: (part, file, check). ``part`` is a
    copied file's name, ``RESIDENT_FILE``, or a layer index; ``check()`` raises PackedFormatError.
    ``layers``: the expert files to check (default: every file the copy holds, ``m.held_layers``)."""
    checks: list[tuple[str | int, Path, Callable[[], None]]] = [
        (name, path / name, lambda name=name, meta=meta: verify_copied_file(path / name, meta, progress))
        for name, meta in m.files.items()
    ]
    checks.append(
        (
            RESIDENT_FILE,
            path / RESIDENT_FILE,
            lambda: verify_resident_file(path / RESIDENT_FILE, m.resident_bytes, m.resident_crc32, progress),
        )
    )
    checks += [
        (e.layer, path / e.file, lambda e=e: verify_layer_file(path / e.file, e, progress))
        for e in (m.held_layers if layers is None else layers)
    ]
    return checks


def bytes_to_check(path: Path, m: Manifest, layers: Sequence[LayerEntry] | None = None) -> int:
    """What ``packed_checks`` reports to its progress in all: the copied files, the resident tensors' data
    (not the header) and the held (or ``layers``') expert blocks (not headers). The total for a bar."""
    try:
        resident = sum(t.nbytes for t in _read_resident_header(path / RESIDENT_FILE).values())
    except (PackedFormatError, OSError):  # damaged or missing: the checks say so; the bar needs a number
        resident = m.resident_bytes
    blocks = sum(e.expert_bytes for e in (m.held_layers if layers is None else layers))
    return sum(meta["bytes"] for meta in m.files.values()) + resident + blocks


def read_any_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a whole packed copy or of a pipeline stage's copy (``Manifest.stage`` set)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return read_manifest(path)  # raises, saying whether a repack is unfinished
    return Manifest.from_json_bytes(file.read_bytes(), file, stage_ok=True)


def check_held_files(path: Path, m: Manifest, layers: Sequence[LayerEntry] | None = None) -> None:
    """``packed.check_packed_files`` (sizes, headers, resident names) over the expert files a copy holds
    (or ``layers`` of them): a stage's copy has no others."""
    held = tuple(m.held_layers if layers is None else layers)
    check_packed_files(path, dataclasses.replace(m, layers=held, stage=None))


def select_layers(m: Manifest, layers: range | None) -> tuple[LayerEntry, ...]:
    """The entries of ``layers`` (None: every layer the copy holds).

    Raises:
        PackedFormatError: the copy is a stage's that does not hold all of ``layers``.
    """
    if layers is None:
        return m.held_layers
    held = {e.layer for e in m.held_layers}
    missing = [i for i in layers if i not in held]
    if missing:
        raise PackedFormatError(
            f"this copy holds {describe_layers(held)} only (a pipeline stage's copy), not "
            f"{describe_layers(missing)}: verify --layers within those it holds"
        )
    return tuple(m.layers[i] for i in layers)


def verify_packed(
    path: str | os.PathLike, progress: Progress | None = None, layers: range | None = None
) -> Manifest:
    """Re-checks every checksum and bound of a packed model: copied files, resident tensors, experts.

    A pipeline stage's copy (``streamer repack --layers``) is checked over the layers it holds.

    Args:
        layers: check only these layers' expert files (the copied files and resident tensors always).

    Raises:
        PackedFormatError: naming the first bad file / tensor / layer / expert / component.
    """
    path = Path(path)
    m = read_any_manifest(path)
    entries = select_layers(m, layers)
    try:
        check_held_files(path, m, entries)
    except PackedFormatError as e:
        raise PackedFormatError(f"{e}; {repair_hint(path, m)}") from None
    for _, file, check in packed_checks(path, m, progress, entries):
        try:
            check()
        except PackedFormatError as e:
            raise PackedFormatError(f"{e}; {repair_hint(path, m, file)}") from None
    return m


def verify_copied_file(file: Path, meta: dict, progress: Progress | None = None) -> None:
    """Checks a copied file (config, tokenizer, ...) against the manifest's size and CRC-32."""
    got = crc32_file(file, progress)
    if got != meta["crc32"]:
        raise PackedFormatError(f"{file}: checksum mismatch (manifest {meta['crc32']:08x}, file {got:08x})")
