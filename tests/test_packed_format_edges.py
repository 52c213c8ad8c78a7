"""The packed format's manifest and layer header, alone, against formats/PACKED.md: what mutation testing
found unguarded (tools/mutation.py packed_format). Expected documents and messages are written by hand
from the spec, never taken from the writer."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest

from streamer.errors import PackedFormatError
from streamer.storage.packed_format import (
    Component,
    LayerEntry,
    Manifest,
    check_layer_entry,
    check_layer_header,
    make_layer_entry,
    pack_layer_header,
    pruned_label,
    unpack_layer_header,
)

PATH = Path("/m/manifest.json")
ANEW = 'delete /m and run "streamer repack" again'
GATE = Component("gate_proj.weight", "model.gate", "U32", (4, 8), 0, 128, 4, 64, "affine")
SCALES = Component("gate_proj.scales", "model.scales", "BF16", (4, 1), 0, 8, None, None, None)


def _entry(layer=0, experts=2):
    entry = make_layer_entry(layer, experts, [GATE, SCALES])
    return dataclasses.replace(entry, crc32=tuple((0x1234ABCD + e, 0xFF + e) for e in range(experts)))


def _manifest(pruned=None, layers=1):
    return Manifest(
        model_type="qwen3_5_moe",
        source={"name": "src", "config_sha256": "ab", "fingerprint": "cd"},
        resident_bytes=1000,
        resident_crc32={"norm": 0xDEADBEEF},
        layers=tuple(_entry(i) for i in range(layers)),
        files={"config.json": {"bytes": 12, "crc32": 0x0A}},
        pruned=pruned,
    )


def test_layer_layout_follows_the_alignment_rules():
    entry = _entry()
    assert [(c.offset, c.nbytes) for c in entry.components] == [(0, 128), (128, 8)]
    assert (entry.data_offset, entry.block_bytes) == (16384, 16384)
    assert entry.file == "experts/layer_000.bin" and entry.file_bytes == 16384 * 3
    assert entry.padding() == [(136, 16384)]
    odd = make_layer_entry(7, 1, [SCALES, GATE])  # 8 bytes, then the next component at 64
    assert [c.offset for c in odd.components] == [0, 64] and odd.padding() == [(8, 64), (192, 16384)]
    with pytest.raises(KeyError, match="layer 0 has no component 'up_proj.weight'"):
        entry.component("up_proj.weight")


def test_manifest_json_is_the_documented_document():
    raw = _manifest().to_json_bytes()
    assert raw.startswith(b'{\n "format": "streamer-packed",\n "version": 1,\n')  # indent 1, as in the spec
    assert raw.endswith(b"}\n")
    assert json.loads(raw) == {
        "format": "streamer-packed",
        "version": 1,
        "model_type": "qwen3_5_moe",
        "source": {"name": "src", "config_sha256": "ab", "fingerprint": "cd"},
        "alignment": {"block": 16384, "component": 64},
        "resident": {"file": "resident.safetensors", "bytes": 1000, "crc32": {"norm": "deadbeef"}},
        "files": {"config.json": {"bytes": 12, "crc32": "0000000a"}},
        "layers": [
            {
                "layer": 0,
                "file": "experts/layer_000.bin",
                "num_experts": 2,
                "data_offset": 16384,
                "block_bytes": 16384,
                "file_bytes": 49152,
                "components": [
                    {
                        "name": "gate_proj.weight",
                        "tensor": "model.gate",
                        "dtype": "U32",
                        "shape": [4, 8],
                        "offset": 0,
                        "nbytes": 128,
                        "bits": 4,
                        "group_size": 64,
                        "mode": "affine",
                    },
                    {
                        "name": "gate_proj.scales",
                        "tensor": "model.scales",
                        "dtype": "BF16",
                        "shape": [4, 1],
                        "offset": 128,
                        "nbytes": 8,
                        "bits": None,
                        "group_size": None,
                        "mode": None,
                    },
                ],
                "crc32": ["1234abcd 000000ff", "1234abce 00000100"],
            }
        ],
        "totals": {"resident_bytes": 1000, "expert_bytes": 49152},
    }


def test_manifest_round_trips_with_and_without_a_prune_record():
    pruned = {"method": "reap", "experts": 3, "source_experts": 4, "source": {"name": "big"}}
    for m in (_manifest(), _manifest(pruned=pruned), _manifest(layers=3)):
        assert Manifest.from_json_bytes(m.to_json_bytes(), PATH) == m
    assert "pruned" in json.loads(_manifest(pruned=pruned).to_json_bytes())
    assert "pruned" not in json.loads(_manifest().to_json_bytes())  # unpruned manifests stay as they were


def test_prune_label():
    assert pruned_label(_manifest()) is None
    full = {"method": "reap", "experts": 3, "source_experts": 4, "source": {"name": "big"}}
    assert pruned_label(_manifest(pruned=full)) == "pruned by reap: 3 of 4 experts per layer kept (from big)"
    bare = {"method": "freq", "experts": 2}
    assert pruned_label(_manifest(pruned=bare)) == "pruned by freq: 2 of ? experts per layer kept (from ?)"


def _doc(**changes):
    doc = json.loads(_manifest(layers=2).to_json_bytes())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "/m/manifest.json: not valid JSON ("),
        (b"[1, 2]", f"/m/manifest.json: not a streamer-packed manifest; {ANEW}"),
        (_doc(format="other"), f"/m/manifest.json: not a streamer-packed manifest; {ANEW}"),
        (
            _doc(version=2),
            "/m/manifest.json: packed format version 2, this streamer reads version 1: use the streamer "
            f"that wrote it, or {ANEW}",
        ),
        (
            _doc(pruned={"method": "reap"}),
            "/m/manifest.json: malformed manifest (ValueError(\"'pruned' is not",
        ),
        (_doc(pruned={"experts": 3, "method": 1}), "/m/manifest.json: malformed manifest (ValueError("),
        (_doc(files=[1]), "/m/manifest.json: malformed manifest ("),
    ],
)
def test_bad_manifests_name_the_file_and_the_fix(raw, message):
    with pytest.raises(PackedFormatError) as err:
        Manifest.from_json_bytes(raw, PATH)
    assert str(err.value).startswith(message), str(err.value)
    assert str(err.value).endswith(ANEW)


def test_layers_out_of_order_are_refused_with_the_fix():
    doc = json.loads(_manifest(layers=2).to_json_bytes())
    doc["layers"].reverse()
    with pytest.raises(PackedFormatError) as err:
        Manifest.from_json_bytes(json.dumps(doc).encode(), PATH)
    assert str(err.value) == f"/m/manifest.json: layer entries out of order (found 1 at 0); {ANEW}"


def _bad_entry(**changes):
    return dataclasses.replace(_entry(layer=3), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"block_bytes": 0}, "layer 3: block size 0 / data offset not 16 KiB aligned"),
        ({"block_bytes": 16384 + 64}, "layer 3: block size 16448 / data offset not 16 KiB aligned"),
        ({"data_offset": 16384 + 4096}, "layer 3: block size 16384 / data offset not 16 KiB aligned"),
        ({"num_experts": 0, "crc32": ()}, "layer 3: 0 experts, data offset 16384: invalid"),
        ({"data_offset": 0}, "layer 3: 2 experts, data offset 0: invalid"),
        (
            {"components": (GATE, dataclasses.replace(SCALES, offset=128, nbytes=9))},
            "layer 3 component gate_proj.scales: 9 bytes does not match BF16[4, 1]",
        ),
        (
            {"components": (GATE, dataclasses.replace(SCALES, offset=128, dtype="Q4"))},
            "layer 3 component gate_proj.scales: 8 bytes does not match Q4[4, 1]",
        ),
        (
            {"components": (GATE, dataclasses.replace(SCALES, offset=96))},
            "layer 3 component gate_proj.scales: bytes [96, 104) overlap, misalign or leave the "
            "16384-byte block",
        ),
        (
            {"components": (GATE, dataclasses.replace(SCALES, offset=136))},
            "layer 3 component gate_proj.scales: bytes [136, 144) overlap, misalign",
        ),
        (
            {"components": (GATE, dataclasses.replace(SCALES, offset=16384 - 64 + 64))},
            "layer 3 component gate_proj.scales: bytes [16384, 16392) overlap, misalign",
        ),
        ({"crc32": ((1, 2),)}, "layer 3: checksum table is not 2 × 2"),
        ({"crc32": ((1, 2), (3,))}, "layer 3: checksum table is not 2 × 2"),
    ],
)
def test_layer_table_checks_name_layer_and_component(changes, message):
    with pytest.raises(PackedFormatError) as err:
        check_layer_entry(_bad_entry(**changes), PATH)
    assert str(err.value).startswith(f"/m/manifest.json: {message}"), str(err.value)


def test_layer_table_edges_that_are_valid():
    check_layer_entry(_entry(layer=3), PATH)  # no expected layer: any index
    check_layer_entry(_bad_entry(crc32=()), PATH)  # no checksums yet (while repacking)
    last = dataclasses.replace(SCALES, offset=16384 - 64)  # ends exactly at the block's end - 56
    check_layer_entry(_bad_entry(components=(GATE, last)), PATH, expected_layer=3)
    exact = dataclasses.replace(SCALES, shape=(4, 16), nbytes=128, offset=16384 - 128)  # ends at the end
    check_layer_entry(_bad_entry(components=(GATE, exact)), PATH)


# ---------------------------------------------------------------------------------------------------------
# Layer-file header: magic, version, fields, component table, CRC-32, zeros


def _header_by_hand(entry: LayerEntry) -> bytes:
    body = b"STRMEXPT" + struct.pack("<IIIIQQ", 1, entry.layer, entry.num_experts, 2, 16384, 16384)
    body += b"gate_proj.weight".ljust(32, b"\0") + b"U32".ljust(8, b"\0") + struct.pack("<QQ", 0, 128)
    body += b"gate_proj.scales".ljust(32, b"\0") + b"BF16".ljust(8, b"\0") + struct.pack("<QQ", 128, 8)
    body += struct.pack("<I", zlib.crc32(body))
    return body + bytes(16384 - len(body))


def test_header_bytes_are_the_documented_layout():
    entry = _entry(layer=5)
    raw = pack_layer_header(entry)
    assert raw == _header_by_hand(entry)
    assert unpack_layer_header(raw, PATH) == {
        "layer": 5,
        "num_experts": 2,
        "data_offset": 16384,
        "block_bytes": 16384,
        "components": [("gate_proj.weight", "U32", 0, 128), ("gate_proj.scales", "BF16", 128, 8)],
        "header_size": 40 + 2 * 56 + 4,
    }
    check_layer_header(raw, entry, PATH)


def _patched(raw: bytes, offset: int, data: bytes, fix_crc: bool = True) -> bytes:
    out = bytearray(raw)
    out[offset : offset + len(data)] = data
    if fix_crc:
        size = 40 + 2 * 56
        out[size : size + 4] = struct.pack("<I", zlib.crc32(bytes(out[:size])))
    return bytes(out)


def test_bad_headers_say_what_is_wrong():
    entry = _entry(layer=5)
    raw = pack_layer_header(entry)
    cases = [
        (raw[:20], "not a streamer expert file (bad magic)"),
        (b"STRMEXPX" + raw[8:], "not a streamer expert file (bad magic)"),
        (_patched(raw, 8, struct.pack("<I", 2)), "expert file version 2, this streamer reads 1"),
        (_patched(raw, 20, struct.pack("<I", 400), fix_crc=False), "header of 400 components does not fit"),
        (raw[:100], "header of 2 components does not fit before byte 16384"),
        (_patched(raw, 60, b"X", fix_crc=False), "header checksum mismatch (corrupt header)"),
    ]
    for bad, message in cases:
        with pytest.raises(PackedFormatError) as err:
            unpack_layer_header(bad, PATH)
        assert str(err.value).startswith(f"/m/manifest.json: {message}"), (message, str(err.value))
    # The header fits the raw bytes but not before the data: a small data offset in the header.
    tiny_offset = _patched(raw, 24, struct.pack("<Q", 64))
    with pytest.raises(PackedFormatError, match="header of 2 components does not fit before byte 64"):
        unpack_layer_header(tiny_offset, PATH)


def test_header_must_agree_with_the_manifest():
    entry = _entry(layer=5)
    raw = pack_layer_header(entry)
    for key, value in (("layer", 6), ("num_experts", 3), ("block_bytes", 32768)):
        with pytest.raises(PackedFormatError, match=f"header {key} 5|header {key} 2|header {key} 16384"):
            check_layer_header(raw, dataclasses.replace(entry, **{key: value}), PATH)
    with pytest.raises(PackedFormatError, match="header layer 5, manifest says 6"):
        check_layer_header(raw, dataclasses.replace(entry, layer=6), PATH)
    other = dataclasses.replace(entry, components=(GATE, dataclasses.replace(SCALES, offset=192)))
    with pytest.raises(PackedFormatError, match="header component table differs from the manifest's layer 5"):
        check_layer_header(pack_layer_header(other), entry, PATH)
    dirty = raw[:-1] + b"\x01"
    with pytest.raises(PackedFormatError, match="non-zero bytes in the header padding"):
        check_layer_header(dirty, entry, PATH)
    check_layer_header(raw, entry, PATH)


def test_layer_entries_must_agree_with_their_own_table():
    def load(edit):
        doc = json.loads(_manifest(layers=2).to_json_bytes())
        edit(doc["layers"][1])
        with pytest.raises(PackedFormatError) as err:
            Manifest.from_json_bytes(json.dumps(doc).encode(), PATH)
        return str(err.value)

    bad_file = load(lambda layer: layer.update(file="experts/layer_009.bin"))
    assert "layer 1: file 'experts/layer_009.bin'/49152 disagrees with its table" in bad_file
    bad_size = load(lambda layer: layer.update(file_bytes=49153))
    assert "layer 1: file 'experts/layer_001.bin'/49153 disagrees with its table" in bad_size
    bad_rows = load(lambda layer: layer.update(crc32=layer["crc32"][:1]))
    assert "layer 1: 1 crc rows, 2 experts" in bad_rows


def test_a_later_data_offset_round_trips():
    m = _manifest()
    m = dataclasses.replace(m, layers=(dataclasses.replace(m.layers[0], data_offset=32768),))
    back = Manifest.from_json_bytes(m.to_json_bytes(), PATH)
    assert back.layers[0].data_offset == 32768 and back.layers[0].file_bytes == 32768 + 2 * 16384


def test_padding_from_the_block_start_and_none_when_components_fill_it():
    late = LayerEntry(0, 1, 16384, (dataclasses.replace(GATE, offset=64),))
    assert late.padding() == [(0, 64), (192, 16384)]
    full = LayerEntry(0, 1, 16384, (dataclasses.replace(GATE, shape=(4, 1024), nbytes=16384),))
    assert full.padding() == []


def test_boundary_layer_tables():
    check_layer_entry(_bad_entry(num_experts=1, crc32=((1, 2),)), PATH)  # one expert is a layer too
    overlap = (GATE, dataclasses.replace(SCALES, offset=64))  # aligned, inside gate_proj.weight's bytes
    with pytest.raises(PackedFormatError, match=r"gate_proj.scales: bytes \[64, 72\) overlap"):
        check_layer_entry(_bad_entry(components=overlap), PATH)


def test_boundary_headers():
    entry = _entry(layer=5)
    raw = pack_layer_header(entry)
    size = 40 + 2 * 56 + 4
    assert unpack_layer_header(raw[:size], PATH)["header_size"] == size  # the header alone suffices
    with pytest.raises(PackedFormatError, match="header of 2 components does not fit before byte 16384"):
        unpack_layer_header(raw[:40], PATH)  # the fixed fields only
    # A header whose data starts right after it (a reader does not require 16 KiB here).
    snug = _patched(raw, 24, struct.pack("<Q", size))
    assert unpack_layer_header(snug, PATH)["data_offset"] == size
