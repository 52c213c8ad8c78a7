"""A packed model written back in the mlx-community checkpoint layout, so mlx-lm (and `repack`) load it.

Resident tensors keep their names and bytes; each layer's experts become the stacked tensors they were
cut from (``Component.tensor``, shape [E, ...]), filled one expert at a time from the layer file, so
memory stays at one block whatever the model's size. Tensors go into shards of at most
``SHARD_BYTES`` in name order (``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``),
and the copied files (config, tokenizer, template) come along. The checkpoint is assembled in
``DIR.partial`` and renamed when complete: an interrupted export never looks finished (run it again).

Names: E = experts of a layer, B = block bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from streamer.errors import ConfigError
from streamer.storage.files import CHUNK_BYTES, fsync_dir, read_into
from streamer.storage.packed import PackedModel
from streamer.storage.packed_format import RESIDENT_FILE
from streamer.storage.safetensors_file import SafetensorsWriter, tensor_nbytes

SHARD_BYTES = 5 << 30  # mlx-lm's default shard size


def export_checkpoint(model: PackedModel, out: str | os.PathLike) -> Path:
    """Writes ``model`` as an mlx-community checkpoint directory ``out`` (which must not exist).

    Raises:
        ConfigError: ``out`` already exists.
    """
    out = Path(out).expanduser()
    if out.exists():
        raise ConfigError(f"{out} already exists; give a new directory for the checkpoint (or delete it)")
    part = out.with_name(out.name + ".partial")
    if part.exists():
        shutil.rmtree(part)  # an interrupted export: start over
    part.mkdir(parents=True)
    specs = _specs(model)
    shards = _shards(specs)
    weight_map = {}
    for i, names in enumerate(shards):
        file = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        writer = SafetensorsWriter(part / file, {n: specs[n] for n in names})
        try:
            _fill(model, writer, set(names))
            os.fsync(writer._file.fileno())
        finally:
            writer.close()
        weight_map.update(dict.fromkeys(names, file))
    total = sum(tensor_nbytes(*specs[n]) for n in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    for name in model.manifest.files:
        shutil.copyfile(model.path / name, part / name)
    fsync_dir(part)
    os.replace(part, out)
    return out


def _specs(model: PackedModel) -> dict[str, tuple[str, tuple[int, ...]]]:
    specs = {t.name: (t.dtype, t.shape) for t in model.resident_tensors().values()}
    for entry in model.manifest.layers:
        for c in entry.components:
            specs[c.tensor] = (c.dtype, (entry.num_experts, *c.shape))
    return specs


def _shards(specs: dict) -> list[list[str]]:
    shards, size = [[]], 0
    for name in sorted(specs):
        n = tensor_nbytes(*specs[name])
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _fill(model: PackedModel, writer: SafetensorsWriter, names: set[str]) -> None:
    """Writes every tensor of ``names``: resident bytes in chunks, experts one block at a time."""
    buf = memoryview(bytearray(CHUNK_BYTES))
    fd = os.open(model.path / RESIDENT_FILE, os.O_RDONLY)
    try:
        for t in model.resident_tensors().values():
            if t.name not in names:
                continue
            for at in range(0, t.nbytes, len(buf)):
                n = min(len(buf), t.nbytes - at)
                read_into(fd, [buf[:n]], t.offset + at)
                writer.write(t.name, at, buf[:n])
    finally:
        os.close(fd)
    for entry in model.manifest.layers:
        comps = [c for c in entry.components if c.tensor in names]
        if not comps:
            continue
        block = memoryview(bytearray(entry.block_bytes))
        fd = os.open(model.path / entry.file, os.O_RDONLY)
        try:
            for e in range(entry.num_experts):
                read_into(fd, [block], entry.block_offset(e))
                for c in comps:
                    writer.write(c.tensor, e * c.nbytes, block[c.offset : c.offset + c.nbytes])
        finally:
            os.close(fd)
