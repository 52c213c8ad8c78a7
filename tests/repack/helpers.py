"""Shared by the repack tests: reading packed bytes back, repacking, editing checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx

from streamer.storage.checkpoint import load_checkpoint
from streamer.storage.packed import open_packed
from streamer.storage.packed_format import RESIDENT_FILE
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.safetensors_file import read_header

SHARD_BYTES = 256 << 10


class Interrupt(Exception):
    pass


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _assert_reproduces(src: Path, dst: Path) -> None:
    """Every resident tensor and every expert component holds exactly the source's bytes."""
    tensors = load_checkpoint(src).tensors
    resident = read_header(dst / RESIDENT_FILE)[0]
    model = open_packed(dst)
    expert_names = {c.tensor for e in model.manifest.layers for c in e.components}
    assert set(resident) | expert_names == set(tensors) and not set(resident) & expert_names
    for name, t in resident.items():
        s = tensors[name]
        assert (t.dtype, t.shape) == (s.dtype, s.shape)
        assert _read(t.path, t.offset, t.nbytes) == _read(s.path, s.offset, s.nbytes), name
    for entry in model.manifest.layers:
        for e in range(entry.num_experts):
            block = _read(dst / entry.file, entry.block_offset(e), entry.block_bytes)
            for c in entry.components:
                s = tensors[c.tensor]
                assert s.shape == (entry.num_experts, *c.shape)
                want = _read(s.path, s.offset + e * c.nbytes, c.nbytes)
                assert block[c.offset : c.offset + c.nbytes] == want, (
                    entry.layer,
                    e,
                    c.name,
                )


def _repack(src: Path, dst: Path, **kw):
    return run_repack(make_plan(src, dst), **kw)


def _save_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A single-shard copy of ``src`` whose tensors went through ``edit(dict)``."""
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(mx.load(str(shard)))
    edit(tensors)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "mlx"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _interrupt_after_layer(n):
    def hook(layer):
        if layer == n:
            raise Interrupt

    return hook
