"""The packed model format (formats/PACKED.md, version 1) defined once in code: constants, the manifest and
the layer-file header.

A packed directory holds ``manifest.json`` (written last: its presence means complete),
``resident.safetensors`` (every tensor except routed experts, bytes as in the source) and
``experts/layer_NNN.bin``: a header, then one block per expert holding that expert's gate/up/down
components at 64-byte aligned offsets, each block padded to a multiple of 16 KiB.

Names: E = experts in a layer, C = components in a block (<= 9: gate/up/down x weight/scales/biases).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamer.errors import PackedFormatError
from streamer.storage.safetensors_file import DTYPE_SIZES, tensor_nbytes

FORMAT_NAME = "streamer-packed"


FORMAT_VERSION = 1


LAYER_MAGIC = b"STRMEXPT"


BLOCK_ALIGN = 16 << 10  # Apple's page size; a multiple of O_DIRECT's 4 KiB


COMPONENT_ALIGN = 64


HEADER_BYTES = BLOCK_ALIGN  # where v1 writers put the first block


MANIFEST_FILE = "manifest.json"


RESIDENT_FILE = "resident.safetensors"


EXPERTS_DIR = "experts"


PROGRESS_FILE = "repack-progress.json"  # present only while a repack is unfinished


# magic, version, layer, experts, components, data_offset, block_bytes; then C × (name, dtype, offset, nbytes)
_HEADER_FIXED = struct.Struct("<8sIIIIQQ")


_HEADER_COMPONENT = struct.Struct("<32s8sQQ")


_LAYER_TENSOR = re.compile(r"^language_model\.model\.layers\.(\d+)\.")


def resident_layer_of(name: str) -> int | None:
    """The decoder layer a resident tensor belongs to, or None (embedding, final norm, output head)."""
    m = _LAYER_TENSOR.match(name)
    return int(m.group(1)) if m else None


def describe_layers(layers: Iterable[int]) -> str:
    """Layer indices in runs: "layers 0-3, 6" for [0, 1, 2, 3, 6], "layer 2" for [2]."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    word = "layer" if len(runs) == 1 and runs[0][0] == runs[0][1] else "layers"
    return f"{word} " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def layer_file_name(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer_{layer:03d}.bin"


@dataclass(frozen=True)
class Component:
    """One tensor of an expert inside its block, e.g. ``down_proj.scales``."""

    name: str  # "<projection>.<kind>"
    tensor: str  # the stacked source tensor this is one expert's slice of
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]  # one expert's shape: the source tensor without its leading expert axis
    offset: int  # within the block
    nbytes: int
    bits: int | None = None  # None for unquantized components
    group_size: int | None = None
    mode: str | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Component:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class LayerEntry:
    """One ``experts/layer_NNN.bin``: E blocks of ``block_bytes`` starting at ``data_offset``."""

    layer: int
    num_experts: int
    block_bytes: int
    components: tuple[Component, ...]
    data_offset: int = HEADER_BYTES
    crc32: tuple[tuple[int, ...], ...] = ()  # [E][C] CRC-32 of each component's bytes

    @property
    def file(self) -> str:
        return layer_file_name(self.layer)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.num_experts * self.block_bytes

    @property
    def expert_bytes(self) -> int:
        return self.num_experts * self.block_bytes

    def block_offset(self, expert: int) -> int:
        return self.data_offset + expert * self.block_bytes

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"layer {self.layer} has no component {name!r}")

    def padding(self) -> list[tuple[int, int]]:
        """Byte ranges of a block not covered by components: they must be zero."""
        gaps, pos = [], 0
        for c in self.components:
            if c.offset > pos:
                gaps.append((pos, c.offset))
            pos = c.offset + c.nbytes
        if pos < self.block_bytes:
            gaps.append((pos, self.block_bytes))
        return gaps


def make_layer_entry(layer: int, num_experts: int, components: Sequence[Component]) -> LayerEntry:
    """Lays out a block: components in the given order, each at a 64-byte boundary, padded to 16 KiB."""
    placed, pos = [], 0
    for c in components:
        pos = align_up(pos, COMPONENT_ALIGN)
        placed.append(dataclasses.replace(c, offset=pos))
        pos += c.nbytes
    return LayerEntry(layer, num_experts, align_up(max(pos, 1), BLOCK_ALIGN), tuple(placed))


@dataclass(frozen=True)
class StageRecord:
    """What a pipeline stage's copy (``streamer repack --layers FIRST:LAST``) holds of the whole model.

    Its expert files are layers FIRST..LAST (inclusive); its resident file holds those layers' resident
    tensors, plus the embedding, final norm and output head when FIRST is 0 (rank 0's stage holds them).
    The whole model's resident bytes per layer are kept so that every rank computes the same split.
    """

    first: int
    last: int
    resident_layer_bytes: tuple[int, ...]  # the whole model's resident tensor bytes of each layer
    resident_other_bytes: int  # the whole model's resident bytes outside any layer (embedding, head, norm)

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def front(self) -> bool:
        return self.first == 0

    def holds(self, name: str) -> bool:
        """Whether the resident tensor ``name`` belongs in this stage's resident file."""
        i = resident_layer_of(name)
        return self.front if i is None else i in self.layers

    def to_json(self) -> dict:
        return {
            "layers": [self.first, self.last],
            "resident_layer_bytes": list(self.resident_layer_bytes),
            "resident_other_bytes": self.resident_other_bytes,
        }

    @classmethod
    def from_json(cls, d: dict, num_layers: int) -> StageRecord:
        first, last = (int(x) for x in d["layers"])
        record = cls(
            first, last, tuple(int(b) for b in d["resident_layer_bytes"]), int(d["resident_other_bytes"])
        )
        if not 0 <= first <= last < num_layers or len(record.resident_layer_bytes) != num_layers:
            raise ValueError(f"stage layers {first}:{last} or its byte table do not fit {num_layers} layers")
        return record


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to find, type and check every byte of a packed model."""

    model_type: str
    source: dict  # name, config_sha256, fingerprint of the source checkpoint
    resident_bytes: int
    resident_crc32: dict[str, int]  # tensor name -> CRC-32 of its bytes
    layers: tuple[LayerEntry, ...]
    files: dict[str, dict] = field(default_factory=dict)  # copied file -> {"bytes", "crc32"}
    pruned: dict | None = None  # set by `streamer prune`: method, experts kept, the unpruned source
    stage: StageRecord | None = None  # set by `streamer repack --layers`: a stage's copy, not a whole model

    @property
    def held_layers(self) -> tuple[LayerEntry, ...]:
        """The layers whose expert files this copy holds: all, or a stage's."""
        return self.layers if self.stage is None else self.layers[self.stage.first : self.stage.last + 1]

    @property
    def expert_bytes(self) -> int:
        return sum(e.file_bytes for e in self.held_layers)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes + sum(f["bytes"] for f in self.files.values())

    def to_json_bytes(self) -> bytes:
        layers = []
        for e in self.layers:
            layers.append(
                {
                    "layer": e.layer,
                    "file": e.file,
                    "num_experts": e.num_experts,
                    "data_offset": e.data_offset,
                    "block_bytes": e.block_bytes,
                    "file_bytes": e.file_bytes,
                    "components": [c.to_json() for c in e.components],
                    "crc32": [" ".join(f"{c:08x}" for c in row) for row in e.crc32],
                }
            )
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_type": self.model_type,
            "source": self.source,
            "alignment": {"block": BLOCK_ALIGN, "component": COMPONENT_ALIGN},
            "resident": {
                "file": RESIDENT_FILE,
                "bytes": self.resident_bytes,
                "crc32": {k: f"{v:08x}" for k, v in sorted(self.resident_crc32.items())},
            },
            "files": {
                k: {"bytes": v["bytes"], "crc32": f"{v['crc32']:08x}"} for k, v in sorted(self.files.items())
            },
            "layers": layers,
            "totals": {"resident_bytes": self.resident_bytes, "expert_bytes": self.expert_bytes},
        }
        if self.pruned is not None:  # absent otherwise: unpruned manifests (and fingerprints) are unchanged
            doc["pruned"] = self.pruned
        if self.stage is not None:  # absent from whole copies, as "pruned"
            doc["stage"] = self.stage.to_json()
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, raw: bytes, path: Path, stage_ok: bool = False) -> Manifest:
        """Parses and checks a manifest; every bound is checked here, before any file is read.

        Args:
            stage_ok: accept a pipeline stage's copy (``stage`` set). Readers that need the whole model
                leave it False, so a stage's copy never passes for a complete one.

        Raises:
            PackedFormatError: malformed, another version, or (without ``stage_ok``) a stage's copy.
        """
        anew = _REPACK_ANEW.format(path.parent)
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PackedFormatError(f"{path}: not valid JSON ({e}); {anew}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise PackedFormatError(f"{path}: not a {FORMAT_NAME} manifest; {anew}")
        if doc.get("version") != FORMAT_VERSION:
            raise PackedFormatError(
                f"{path}: packed format version {doc.get('version')!r}, this streamer reads version "
                f"{FORMAT_VERSION}: use the streamer that wrote it, or {anew}"
            )
        try:
            stage = (
                None if doc.get("stage") is None else StageRecord.from_json(doc["stage"], len(doc["layers"]))
            )
            held = range(len(doc["layers"])) if stage is None else stage.layers
            layers = tuple(_layer_from_json(d, d.get("layer") in held) for d in doc["layers"])
            manifest = cls(
                model_type=doc["model_type"],
                source=doc["source"],
                resident_bytes=int(doc["resident"]["bytes"]),
                resident_crc32={k: int(v, 16) for k, v in doc["resident"]["crc32"].items()},
                layers=layers,
                files={
                    k: {"bytes": int(v["bytes"]), "crc32": int(v["crc32"], 16)}
                    for k, v in doc["files"].items()
                },
                pruned=_pruned_from_json(doc.get("pruned")),
                stage=stage,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PackedFormatError(f"{path}: malformed manifest ({e!r}); {anew}") from None
        try:
            for i, entry in enumerate(manifest.layers):
                check_layer_entry(entry, path, expected_layer=i)
        except PackedFormatError as e:
            raise PackedFormatError(f"{e}; {anew}") from None
        if stage is not None and not stage_ok:
            raise PackedFormatError(stage_copy_message(manifest, path.parent))
        return manifest


_REPACK_ANEW = 'delete {} and run "streamer repack" again'


def stage_copy_message(manifest: Manifest, path: Path) -> str:
    """Why a stage's copy cannot run as a whole model, and the two ways on."""
    stage, n = manifest.stage, len(manifest.layers)
    missing = describe_layers(i for i in range(n) if i not in stage.layers)
    return (
        f"{path} holds only {describe_layers(stage.layers)} of {n} (a pipeline stage's copy, "
        f"made by streamer repack --layers {stage.first}:{stage.last}); {missing} missing: run it "
        f'as that stage\'s rank under mlx.launch, or complete it with "streamer repack SRC {path}" '
        f"(SRC: the {manifest.source.get('name')!r} checkpoint; it keeps the layers already here)"
    )


def _pruned_from_json(d) -> dict | None:
    if d is None:
        return None
    if not (isinstance(d, dict) and isinstance(d.get("method"), str) and isinstance(d.get("experts"), int)):
        raise ValueError(f"'pruned' is not a prune record: {d!s:.80}")
    return d


def pruned_label(manifest: Manifest) -> str | None:
    """One line saying how the model was pruned (None when it was not), for info, chat and serve."""
    p = manifest.pruned
    if p is None:
        return None
    return (
        f"pruned by {p['method']}: {p['experts']} of {p.get('source_experts', '?')} experts per layer kept "
        f"(from {p.get('source', {}).get('name', '?')})"
    )


def _layer_from_json(d: dict, held: bool = True) -> LayerEntry:
    """One layer's entry; a layer a stage's copy does not hold has no checksums (its file was not written)."""
    entry = LayerEntry(
        layer=int(d["layer"]),
        num_experts=int(d["num_experts"]),
        block_bytes=int(d["block_bytes"]),
        components=tuple(Component.from_json(c) for c in d["components"]),
        data_offset=int(d["data_offset"]),
        crc32=tuple(tuple(int(x, 16) for x in row.split()) for row in d["crc32"]),
    )
    if d["file"] != entry.file or d["file_bytes"] != entry.file_bytes:
        raise ValueError(
            f"layer {entry.layer}: file {d['file']!r}/{d['file_bytes']} disagrees with its table"
        )
    if len(entry.crc32) != (entry.num_experts if held else 0):
        raise ValueError(f"layer {entry.layer}: {len(entry.crc32)} crc rows, {entry.num_experts} experts")
    return entry


def check_layer_entry(entry: LayerEntry, path: Path, expected_layer: int | None = None) -> None:
    """Checks a layer's table is in bounds and aligned; raises naming the layer and component."""
    where = f"{path}: layer {entry.layer}"
    if expected_layer is not None and entry.layer != expected_layer:
        raise PackedFormatError(
            f"{path}: layer entries out of order (found {entry.layer} at {expected_layer})"
        )
    if entry.block_bytes <= 0 or entry.block_bytes % BLOCK_ALIGN or entry.data_offset % BLOCK_ALIGN:
        raise PackedFormatError(f"{where}: block size {entry.block_bytes} / data offset not 16 KiB aligned")
    if entry.num_experts <= 0 or entry.data_offset < _header_size(len(entry.components)):
        raise PackedFormatError(
            f"{where}: {entry.num_experts} experts, data offset {entry.data_offset}: invalid"
        )
    end = 0
    for c in entry.components:
        w = f"{where} component {c.name}"
        if c.dtype not in DTYPE_SIZES or tensor_nbytes(c.dtype, c.shape) != c.nbytes:
            raise PackedFormatError(f"{w}: {c.nbytes} bytes does not match {c.dtype}{list(c.shape)}")
        if c.offset % COMPONENT_ALIGN or c.offset < end or c.offset + c.nbytes > entry.block_bytes:
            raise PackedFormatError(
                f"{w}: bytes [{c.offset}, {c.offset + c.nbytes}) overlap, misalign or leave the "
                f"{entry.block_bytes}-byte block"
            )
        end = c.offset + c.nbytes
    if entry.crc32 and (
        len(entry.crc32) != entry.num_experts or any(len(r) != len(entry.components) for r in entry.crc32)
    ):
        raise PackedFormatError(
            f"{where}: checksum table is not {entry.num_experts} × {len(entry.components)}"
        )


def _header_size(num_components: int) -> int:
    return _HEADER_FIXED.size + num_components * _HEADER_COMPONENT.size + 4


def pack_layer_header(entry: LayerEntry) -> bytes:
    """The first ``data_offset`` bytes of a layer file: fixed fields, component table, CRC-32, zeros."""
    body = _HEADER_FIXED.pack(
        LAYER_MAGIC,
        FORMAT_VERSION,
        entry.layer,
        entry.num_experts,
        len(entry.components),
        entry.data_offset,
        entry.block_bytes,
    )
    for c in entry.components:
        body += _HEADER_COMPONENT.pack(c.name.encode(), c.dtype.encode(), c.offset, c.nbytes)
    body += struct.pack("<I", zlib.crc32(body))
    return body.ljust(entry.data_offset, b"\0")


def unpack_layer_header(raw: bytes, path: Path) -> dict:
    """Parses a layer file header (without the manifest): fields and the component table."""
    if len(raw) < _HEADER_FIXED.size or raw[:8] != LAYER_MAGIC:
        raise PackedFormatError(f"{path}: not a streamer expert file (bad magic)")
    magic, version, layer, experts, ncomp, data_offset, block_bytes = _HEADER_FIXED.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise PackedFormatError(
            f"{path}: expert file version {version}, this streamer reads {FORMAT_VERSION}"
        )
    size = _header_size(ncomp)
    if size > len(raw) or size > data_offset:
        raise PackedFormatError(
            f"{path}: header of {ncomp} components does not fit before byte {data_offset}"
        )
    (crc,) = struct.unpack_from("<I", raw, size - 4)
    if zlib.crc32(raw[: size - 4]) != crc:
        raise PackedFormatError(f"{path}: header checksum mismatch (corrupt header)")
    comps = []
    for i in range(ncomp):
        name, dtype, offset, nbytes = _HEADER_COMPONENT.unpack_from(
            raw, _HEADER_FIXED.size + i * _HEADER_COMPONENT.size
        )
        comps.append((name.rstrip(b"\0").decode(), dtype.rstrip(b"\0").decode(), offset, nbytes))
    fields = {"layer": layer, "num_experts": experts, "data_offset": data_offset, "block_bytes": block_bytes}
    return {**fields, "components": comps, "header_size": size}


def check_layer_header(raw: bytes, entry: LayerEntry, path: Path) -> None:
    """The header of a layer file must say exactly what the manifest says, then zeros."""
    head = unpack_layer_header(raw, path)
    for key in ("layer", "num_experts", "data_offset", "block_bytes"):
        if head[key] != getattr(entry, key):
            raise PackedFormatError(f"{path}: header {key} {head[key]}, manifest says {getattr(entry, key)}")
    table = [(c.name, c.dtype, c.offset, c.nbytes) for c in entry.components]
    if head["components"] != table:
        raise PackedFormatError(
            f"{path}: header component table differs from the manifest's layer {entry.layer}"
        )
    if any(raw[head["header_size"] : entry.data_offset]):
        raise PackedFormatError(f"{path}: non-zero bytes in the header padding")
