"""Opening a packed model (formats/PACKED.md): read and check its manifest and file sizes, and say how to
repair a damaged copy. The format itself is defined in ``packed_format``; verification in ``verify``."""

from __future__ import annotations

import os
from pathlib import Path

from streamer.errors import CheckpointError, PackedFormatError
from streamer.storage.packed_format import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESIDENT_FILE,
    LayerEntry,
    Manifest,
    check_layer_header,
)
from streamer.storage.paths import looks_like_hub_id
from streamer.storage.safetensors_file import TensorInfo, read_header

# ----------------------------------------------------------------------------------------------------
# Bounded, exact I/O.


# ----------------------------------------------------------------------------------------------------
# Opening and reading a packed model.


class PackedModel:
    """An opened packed directory: its checked manifest and the resident tensors. It holds no open files
    (``ExpertStore`` opens the layer files it reads), so there is nothing to close."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @property
    def num_layers(self) -> int:
        return len(self.manifest.layers)

    def layer(self, layer: int) -> LayerEntry:
        return self.manifest.layers[layer]

    def resident_tensors(self) -> dict[str, TensorInfo]:
        """Where each resident tensor's bytes are in resident.safetensors (header read only)."""
        return _read_resident_header(self.path / RESIDENT_FILE)

    def load_resident(self) -> dict:
        """The resident tensors as (lazy) MLX arrays, exactly as ``mx.load`` reads a checkpoint shard."""
        import mlx.core as mx

        return mx.load(str(self.path / RESIDENT_FILE))


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads ``path/manifest.json``; a directory without one is not (or not yet) a packed model."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        if (path / PROGRESS_FILE).is_file():
            raise PackedFormatError(
                f"{path}: repack is incomplete (interrupted?): "
                "run the same streamer repack command again to resume"
            )
        raise PackedFormatError(f"{path}: not a packed model (no {MANIFEST_FILE}); run streamer repack first")
    return Manifest.from_json_bytes(manifest_path.read_bytes(), manifest_path)


def open_packed(path: str | os.PathLike) -> PackedModel:
    """Opens a packed model, checking every file's size, every layer header and the resident header.

    Reads headers only (milliseconds); ``verify_packed`` re-reads every byte.

    Raises:
        PackedFormatError: naming the file, layer and component that is wrong.
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        check_packed_files(path, manifest)
    except PackedFormatError as e:
        raise PackedFormatError(f"{e}; {repair_hint(path, manifest)}") from None
    return PackedModel(path, manifest)


def check_packed_files(path: Path, manifest: Manifest) -> None:
    """Every file exists with its manifest size; layer headers and resident tensor names match."""
    _check_size(path / RESIDENT_FILE, manifest.resident_bytes)
    names = set(_read_resident_header(path / RESIDENT_FILE))
    if names != set(manifest.resident_crc32):
        diff = sorted(names ^ set(manifest.resident_crc32))
        raise PackedFormatError(
            f"{path / RESIDENT_FILE}: tensors differ from the manifest (e.g. '{diff[0]}')"
        )
    for name, meta in manifest.files.items():
        _check_size(path / name, meta["bytes"])
    for entry in manifest.layers:
        file = path / entry.file
        _check_size(file, entry.file_bytes)
        with open(file, "rb") as f:
            check_layer_header(f.read(entry.data_offset), entry, file)


def _check_size(file: Path, expected: int) -> None:
    if not file.is_file():
        raise PackedFormatError(f"{file}: missing")
    size = file.stat().st_size
    if size != expected:
        raise PackedFormatError(f"{file}: {size} bytes, the manifest says {expected} (truncated or modified)")


def _read_resident_header(file: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(file)[0]
    except CheckpointError as e:
        raise PackedFormatError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Verification: re-read every byte and compare checksums. Repack runs the same code on each layer it writes.


def repair_hint(path: Path, manifest: Manifest, file: Path | None = None) -> str:
    """How to rewrite damaged files of the packed model at ``path`` from its source checkpoint.

    repack re-checks every checksum of a complete copy and rewrites only what is damaged, so the same
    command repairs ``file`` (damage only a full verify sees) and what ``open_packed`` sees alike.
    """
    name = str(manifest.source.get("name", ""))
    src = name if looks_like_hub_id(name) else "SRC"
    # A stage's copy is repaired by the --layers that made it (without them repack would complete it).
    stage = f" --layers {manifest.stage.first}:{manifest.stage.last}" if manifest.stage is not None else ""
    command = f'"streamer repack {src} {path}{stage}"'
    if src == "SRC":
        command += f" (SRC: the {name!r} checkpoint it was packed from)"
    if file is not None:
        return f"rewrite {file} with {command} (it re-checks every file and rewrites only damaged ones)"
    return f"rewrite the damaged files with {command}"
