"""`streamer verify` re-reads every byte: a flipped byte is named by layer, expert and component."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.errors import PackedFormatError
from streamer.storage.packed import open_packed, read_manifest
from streamer.storage.packed_format import RESIDENT_FILE
from streamer.storage.safetensors_file import read_header
from streamer.storage.verify import verify_packed
from tests.repack.helpers import _flip, _repack, _tree


def test_verify_names_layer_expert_component_of_a_flipped_byte(packed):
    entry = read_manifest(packed).layers[2]
    c = entry.component("up_proj.scales")
    _flip(packed / entry.file, entry.block_offset(5) + c.offset + 3)
    open_packed(packed)  # sizes and headers still fine: only a full verify sees it
    with pytest.raises(
        PackedFormatError, match="layer 2 expert 5 component up_proj.scales: checksum mismatch"
    ):
        verify_packed(packed)
    result = CliRunner().invoke(main, ["verify", str(packed)])
    assert result.exit_code == 1 and "layer 2 expert 5 component up_proj.scales" in result.output
    assert "Traceback" not in result.output


def test_verify_catches_resident_padding_header_and_size_damage(packed, tmp_path):
    pristine = _tree(packed)

    def restore():
        for rel, data in pristine.items():
            (packed / rel).write_bytes(data)

    t = read_header(packed / RESIDENT_FILE)[0]["language_model.model.norm.weight"]
    _flip(packed / RESIDENT_FILE, t.offset)
    with pytest.raises(PackedFormatError, match="resident tensor 'language_model.model.norm.weight'"):
        verify_packed(packed)
    restore()
    entry = read_manifest(packed).layers[1]
    _flip(packed / entry.file, entry.block_offset(3) + entry.block_bytes - 1)  # tiny blocks end in padding
    with pytest.raises(PackedFormatError, match="layer 1 expert 3: non-zero bytes in block padding"):
        verify_packed(packed)
    restore()
    _flip(packed / entry.file, 20)
    with pytest.raises(PackedFormatError, match="layer_001.bin"):
        open_packed(packed)
    restore()
    os.truncate(packed / entry.file, entry.file_bytes - 1)
    with pytest.raises(PackedFormatError, match=r"layer_001.bin: 278527 bytes.*truncated"):
        open_packed(packed)
    restore()
    verify_packed(packed)


def test_verify_catches_a_flipped_byte_in_every_component_of_first_and_last_experts(packed):
    """Each (layer, expert, component) is checked, not a sample: damage anywhere is named exactly."""
    pristine = _tree(packed)
    layers = read_manifest(packed).layers
    for entry in (layers[0], layers[-1]):
        for expert in (0, entry.num_experts - 1):
            for c in entry.components:
                _flip(packed / entry.file, entry.block_offset(expert) + c.offset + c.nbytes - 1)
                want = f"layer {entry.layer} expert {expert} component {c.name}: checksum mismatch"
                with pytest.raises(PackedFormatError, match=want):
                    verify_packed(packed)
                (packed / entry.file).write_bytes(pristine[entry.file])
    verify_packed(packed)


def test_repack_verifies_what_it_wrote(sources, tmp_path, monkeypatch):
    """A byte that changes between write and re-read (a bad disk, a bug in the writer) fails the repack
    and leaves no manifest: the verify-after-write is not skipped."""
    from streamer.storage import repack

    real_write_all = repack.write_all
    calls = {"n": 0}

    def corrupting_write_all(fd, buf, offset):
        calls["n"] += 1
        if calls["n"] == 3:  # somewhere inside the first expert layer
            data = bytearray(buf)
            data[len(data) // 2] ^= 0x01
            buf = memoryview(data)
        real_write_all(fd, buf, offset)

    monkeypatch.setattr(repack, "write_all", corrupting_write_all)
    with pytest.raises(PackedFormatError, match=r"\.partial: "):  # caught before the file is renamed
        _repack(sources("tiny"), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
