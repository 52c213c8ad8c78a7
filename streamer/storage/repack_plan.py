"""What `streamer repack` will write, computed from the source checkpoint's headers alone (``--dry-run``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import ConfigError, StreamerError
from streamer.storage.checkpoint import KINDS, PROJECTIONS, Checkpoint, load_checkpoint
from streamer.storage.packed_format import (
    FORMAT_VERSION,
    Component,
    LayerEntry,
    StageRecord,
    make_layer_entry,
    resident_layer_of,
)
from streamer.storage.paths import default_packed_dir, resolve_source
from streamer.storage.safetensors_file import TensorInfo


class DestinationError(StreamerError):
    """DST cannot take this repack: it holds another model, is not a packed dir, or the disk is full."""


@dataclass(frozen=True)
class RepackPlan:
    """What repack will write, computed from headers alone (``--dry-run`` prints it)."""

    checkpoint: Checkpoint
    source_name: str
    fingerprint: str
    dst: Path
    resident: tuple[TensorInfo, ...]  # sorted by name, as they appear in resident.safetensors
    resident_header: bytes
    layers: tuple[LayerEntry, ...]  # without checksums
    sources: tuple[tuple[TensorInfo, ...], ...]  # per layer, the stacked source tensor of each component
    stage: StageRecord | None = None  # --layers: a pipeline stage's copy (``resident`` is the stage's)

    @property
    def held_layers(self) -> tuple[LayerEntry, ...]:
        """The layers whose expert files this repack writes: all, or the stage's."""
        return self.layers if self.stage is None else self.layers[self.stage.first : self.stage.last + 1]

    @property
    def resident_bytes(self) -> int:
        return len(self.resident_header) + sum(t.nbytes for t in self.resident)

    @property
    def expert_bytes(self) -> int:
        return sum(e.file_bytes for e in self.held_layers)

    @property
    def files_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.checkpoint.extra_files)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes

    def whole(self) -> RepackPlan:
        """The plan of the whole model this stage's plan is part of."""
        resident = tuple(self.checkpoint.resident_tensors())
        return dataclasses.replace(
            self, stage=None, resident=resident, resident_header=_resident_header(resident)
        )

    def source_record(self) -> dict:
        ckpt = self.checkpoint
        return {
            "name": self.source_name,
            "config_sha256": ckpt.config_sha256,
            "fingerprint": self.fingerprint,
        }

    def plan_sha256(self) -> str:
        layers = [
            [e.layer, e.num_experts, e.block_bytes, [c.to_json() for c in e.components]] for e in self.layers
        ]
        parts = [FORMAT_VERSION, self.resident_header.hex(), layers]
        if self.stage is not None:  # whole-model plans hash as before, so their journals stay valid
            parts.append(self.stage.to_json())
        doc = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()


def make_plan(
    source: str | os.PathLike, dst: str | os.PathLike | None = None, layers: str | None = None
) -> RepackPlan:
    """Resolves and validates the source, and lays out the packed model.

    Args:
        source: checkpoint directory or hub id in the local Hugging Face cache.
        dst: output directory; defaults to ``paths.default_packed_dir(source)``.
        layers: ``--layers FIRST:LAST`` (inclusive): only what a pipeline stage holding those layers
            needs. None, or every layer: the whole model.

    Raises:
        CheckpointError: when the source is missing, incomplete or not a supported checkpoint.
        ConfigError: ``layers`` is malformed or outside the model.
    """
    path, name = resolve_source(source)
    ckpt = load_checkpoint(path)
    entries, sources = [], []
    for i, E in enumerate(ckpt.num_experts):
        comps, srcs = [], []
        for proj_name in PROJECTIONS:
            proj = ckpt.experts[i][proj_name]
            q = proj.quant
            for kind in KINDS:
                t = proj.tensors.get(kind)
                if t is None:
                    continue
                bits, gs, mode = (q.bits, q.group_size, q.mode) if q else (None, None, None)
                comps.append(
                    Component(
                        f"{proj_name}.{kind}", t.name, t.dtype, t.shape[1:], 0, t.nbytes // E, bits, gs, mode
                    )
                )
                srcs.append(t)
        entries.append(make_layer_entry(i, E, comps))
        sources.append(tuple(srcs))
    resident = tuple(ckpt.resident_tensors())
    stage = None
    if layers is not None:
        stage = stage_record(parse_layers(layers, len(ckpt.num_experts)), len(ckpt.num_experts), resident)
        if stage is not None:
            resident = tuple(t for t in resident if stage.holds(t.name))
    return RepackPlan(
        checkpoint=ckpt,
        source_name=name,
        fingerprint=ckpt.fingerprint(),
        dst=Path(dst).expanduser() if dst is not None else default_packed_dir(source),
        resident=resident,
        resident_header=_resident_header(resident),
        layers=tuple(entries),
        sources=tuple(sources),
        stage=stage,
    )


def parse_layers(text: str, num_layers: int) -> range:
    """``--layers FIRST:LAST``: layer indices, both included, counted from 0 (``0:23`` is 24 layers).

    Raises:
        ConfigError: naming the flag, what is wrong and the form it takes.
    """
    form = f"--layers takes FIRST:LAST, both included, counted from 0 (e.g. 0:{max(num_layers // 2 - 1, 0)})"
    first, _, last = text.replace(" ", "").partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        raise ConfigError(f"{form}; got {text!r}") from None
    if not 0 <= a <= b < num_layers:
        raise ConfigError(f"{form}, within the model's layers 0-{num_layers - 1}; got {text!r}")
    return range(a, b + 1)


def stage_record(held: range, num_layers: int, resident: tuple[TensorInfo, ...]) -> StageRecord | None:
    """What a copy of layers ``held`` records of the whole model; None when ``held`` is every layer."""
    if len(held) == num_layers:
        return None
    layer_bytes, other = [0] * num_layers, 0
    for t in resident:
        i = resident_layer_of(t.name)
        if i is None:
            other += t.nbytes
        else:
            layer_bytes[i] += t.nbytes
    return StageRecord(held.start, held[-1], tuple(layer_bytes), other)


def _resident_header(tensors: tuple[TensorInfo, ...]) -> bytes:
    """A safetensors header as mx.save_safetensors writes it, space-padded to 8 bytes like the reference."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
