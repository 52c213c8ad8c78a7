"""Edges of `verify` that mutation testing found unguarded (tools/mutation.py verify): chunk boundaries,
progress counts, resident and copied-file damage, the repair hint, every check listed once."""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest

from streamer.errors import PackedFormatError
from streamer.storage import verify
from streamer.storage.packed import read_manifest
from streamer.storage.packed_format import RESIDENT_FILE, Component, make_layer_entry, pack_layer_header
from streamer.storage.safetensors_file import read_header
from streamer.storage.verify import packed_checks, verify_layer_file, verify_packed, verify_resident_file
from tests.repack.helpers import _flip, _tree


def test_progress_counts_every_byte_verify_checks(packed):
    m = read_manifest(packed)
    done = []
    verify_packed(packed, progress=done.append)
    resident = sum(t.nbytes for t in read_header(packed / RESIDENT_FILE)[0].values())
    copied = sum(f["bytes"] for f in m.files.values())
    assert sum(done) == copied + resident + sum(e.expert_bytes for e in m.layers)  # headers not counted


@pytest.mark.parametrize("per", [1, 3, 5])
def test_damage_is_found_in_every_position_of_a_chunk(packed, monkeypatch, per):
    """verify reads `per` blocks at a time: the first, a middle and the last expert of a chunk, and the
    last chunk's remainder, are each checked and named."""
    entry = read_manifest(packed).layers[1]
    monkeypatch.setattr(verify, "CHUNK_BYTES", per * entry.block_bytes)
    pristine = _tree(packed)
    c = entry.components[-1]
    for expert in sorted({0, per - 1, per, entry.num_experts - 1}):
        _flip(packed / entry.file, entry.block_offset(expert) + c.offset)
        want = f"layer 1 expert {expert} component {c.name}: checksum mismatch"
        with pytest.raises(PackedFormatError, match=want):
            verify_layer_file(packed / entry.file, entry)
        (packed / entry.file).write_bytes(pristine[entry.file])
    progress = []
    verify_layer_file(packed / entry.file, entry, progress.append)
    assert sum(progress) == entry.expert_bytes
    assert progress[0] == min(per, entry.num_experts) * entry.block_bytes


def test_a_file_shorter_than_its_blocks_is_a_short_read(packed, monkeypatch):
    entry = read_manifest(packed).layers[0]
    monkeypatch.setattr(verify, "_check_size", lambda file, size: None)  # a file that shrinks under us
    os.truncate(packed / entry.file, entry.block_offset(5) + 10)
    with pytest.raises(PackedFormatError, match=r"layer_000.bin: layer 0: short read at expert 0 "):
        verify_layer_file(packed / entry.file, entry)


def test_resident_damage_names_the_tensor(packed):
    m = read_manifest(packed)
    header = read_header(packed / RESIDENT_FILE)[0]
    name = max(header, key=lambda n: header[n].offset)  # the last tensor: a later chunk of the file
    _flip(packed / RESIDENT_FILE, header[name].offset + header[name].nbytes - 1)
    with pytest.raises(PackedFormatError) as err:
        verify_resident_file(packed / RESIDENT_FILE, m.resident_bytes, m.resident_crc32)
    want = f"{packed / RESIDENT_FILE}: resident tensor '{name}': checksum mismatch (manifest "
    assert str(err.value).startswith(want)


def test_resident_tensor_list_must_match_the_manifest(packed):
    m = read_manifest(packed)
    crcs = {**m.resident_crc32, "extra.weight": 0}
    with pytest.raises(PackedFormatError, match=r"tensors differ from the manifest \(e.g. 'extra.weight'\)"):
        verify_resident_file(packed / RESIDENT_FILE, m.resident_bytes, crcs)


def test_resident_progress_counts_each_tensor_once(packed, monkeypatch):
    m = read_manifest(packed)
    monkeypatch.setattr(verify, "CHUNK_BYTES", 100)  # tensors span several chunks and end mid-chunk
    done = []
    verify_resident_file(packed / RESIDENT_FILE, m.resident_bytes, m.resident_crc32, done.append)
    header = read_header(packed / RESIDENT_FILE)[0]
    assert sum(done) == sum(t.nbytes for t in header.values())
    assert max(done) <= 100


def test_copied_file_damage_names_the_file_and_the_repair(packed):
    _flip(packed / "config.json", 0)  # same size: only the checksum can tell
    with pytest.raises(PackedFormatError) as err:
        verify_packed(packed)
    message = str(err.value)
    assert message.startswith(f"{packed / 'config.json'}: checksum mismatch (manifest ")
    assert f'; rewrite {packed / "config.json"} with "streamer repack' in message


def test_checks_cover_every_file_once_in_order(packed):
    m = read_manifest(packed)
    parts = [(part, file) for part, file, _ in packed_checks(packed, m)]
    assert parts == [
        *((name, packed / name) for name in m.files),
        (RESIDENT_FILE, packed / RESIDENT_FILE),
        *((e.layer, packed / e.file) for e in m.layers),
    ]
    # Each check checks its own file: damage in one layer fails that layer's check only.
    _flip(packed / m.layers[2].file, m.layers[2].block_offset(0) + 1)
    failing = []
    for part, _, check in packed_checks(packed, m):
        try:
            check()
        except PackedFormatError:
            failing.append(part)
    assert failing == [2]


def test_verify_hint_names_the_packed_directory(packed):
    entry = read_manifest(packed).layers[0]
    _flip(packed / entry.file, entry.block_offset(0))
    with pytest.raises(PackedFormatError, match=f'"streamer repack SRC {packed}"'):
        verify_packed(packed)


def _hand_made_layer(tmp_path, padding_byte_at=None):
    """A layer file written byte by byte from the format (not by repack): components of 8 and 100 bytes,
    so the block has padding between them ([8, 64)) and after them ([164, 16384))."""
    comps = [
        Component("a.scales", "t.a", "U8", (8,), 0, 8),
        Component("b.weight", "t.b", "U8", (100,), 0, 100),
    ]
    entry = make_layer_entry(0, 3, comps)
    blocks = bytearray(entry.expert_bytes)
    crcs = []
    for e in range(3):
        row = []
        for c in entry.components:
            data = bytes((e * 31 + i) % 251 for i in range(c.nbytes))
            start = entry.block_bytes * e + c.offset
            blocks[start : start + c.nbytes] = data
            row.append(zlib.crc32(data))
        crcs.append(tuple(row))
    if padding_byte_at is not None:
        blocks[entry.block_bytes + padding_byte_at] = 1  # expert 1
    entry = dataclasses.replace(entry, crc32=tuple(crcs))
    file = tmp_path / "layer_000.bin"
    file.write_bytes(pack_layer_header(entry) + bytes(blocks))
    return file, entry


@pytest.mark.parametrize("where", [8, 63, 164, 16383])
def test_padding_anywhere_in_a_block_is_checked(tmp_path, where):
    file, entry = _hand_made_layer(tmp_path)
    assert entry.padding() == [(8, 64), (164, 16384)]
    verify_layer_file(file, entry)
    file, entry = _hand_made_layer(tmp_path, padding_byte_at=where)
    with pytest.raises(PackedFormatError, match="layer 0 expert 1: non-zero bytes in block padding"):
        verify_layer_file(file, entry)


def test_a_resident_file_shorter_than_its_tensors_is_a_short_read(packed, monkeypatch):
    m = read_manifest(packed)
    header = read_header(packed / RESIDENT_FILE)[0]
    name = max(header, key=lambda n: header[n].offset)
    # The file shrinks after its size and header were checked.
    tensors = verify._read_resident_header(packed / RESIDENT_FILE)
    monkeypatch.setattr(verify, "_check_size", lambda file, size: None)
    monkeypatch.setattr(verify, "_read_resident_header", lambda file: tensors)
    os.truncate(packed / RESIDENT_FILE, header[name].offset + 1)
    with pytest.raises(PackedFormatError, match=f"resident.safetensors: short read in tensor '{name}'$"):
        verify_resident_file(packed / RESIDENT_FILE, m.resident_bytes, m.resident_crc32)
