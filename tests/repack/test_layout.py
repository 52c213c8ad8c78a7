"""`streamer repack` output reproduces the source exactly: every preset, mixed precision, pruned layers,
unquantized experts; the resident file loads like the source."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from streamer.storage.packed import open_packed, read_manifest
from streamer.storage.packed_format import PROGRESS_FILE
from streamer.storage.verify import verify_packed
from tests.repack.helpers import (
    _assert_reproduces,
    _repack,
    _save_checkpoint,
)


@pytest.mark.parametrize("preset", ["tiny", "like-397b", "like-35b", "reap", "mixed", "q8"])
def test_repack_reproduces_every_preset(sources, tmp_path, preset):
    src = sources(preset)
    result = _repack(src, tmp_path / "out")
    assert result.status == "packed"
    _assert_reproduces(src, tmp_path / "out")
    manifest = verify_packed(tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    tc, quant = config["text_config"], config["quantization"]
    assert [e.num_experts for e in manifest.layers] == [tc["num_experts"]] * tc["num_hidden_layers"]
    for entry in manifest.layers:
        assert entry.block_bytes % 16384 == 0 and all(c.offset % 64 == 0 for c in entry.components)
        for c in entry.components:
            q = quant.get(c.tensor.rsplit(".", 1)[0], quant)
            assert (c.bits, c.group_size) == (q["bits"], q["group_size"]), (entry.layer, c.name)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert not list((tmp_path / "out").rglob("*.partial")) and not (tmp_path / "out" / PROGRESS_FILE).exists()


def test_mixed_layers_have_their_own_bits_and_block_shapes(sources, tmp_path):
    _repack(sources("mixed"), tmp_path / "out")
    layers = read_manifest(tmp_path / "out").layers
    bits = [{c.name: c.bits for c in e.components if c.name.endswith("weight")} for e in layers]
    assert bits[0] == {"gate_proj.weight": 3, "up_proj.weight": 3, "down_proj.weight": 6}
    assert bits[1] == {"gate_proj.weight": 4, "up_proj.weight": 4, "down_proj.weight": 6}
    assert layers[0].component("down_proj.weight").offset != layers[1].component("down_proj.weight").offset


def test_resident_loads_like_the_source_with_mx_load(sources, tmp_path):
    src = sources("tiny", "float32")
    _repack(src, tmp_path / "out")
    resident = open_packed(tmp_path / "out").load_resident()
    reference = {}
    for shard in src.glob("*.safetensors"):
        reference.update(mx.load(str(shard)))
    assert set(resident) < set(reference)
    for name, arr in resident.items():
        assert arr.dtype == reference[name].dtype and mx.array_equal(arr, reference[name]).item(), name


def test_per_layer_expert_counts_come_from_the_tensors(sources, tmp_path):
    """A REAP-style checkpoint pruned differently per layer (layer 1 keeps 10 of 16 experts)."""
    p = "language_model.model.layers.1.mlp."

    def prune(t):
        for name in [n for n in t if n.startswith(p + "switch_mlp.") or n.startswith(p + "gate.")]:
            t[name] = t[name][:10]

    src = _save_checkpoint(sources("tiny"), tmp_path / "pruned", prune)
    _repack(src, tmp_path / "out")
    assert [e.num_experts for e in read_manifest(tmp_path / "out").layers] == [16, 10, 16, 16]
    _assert_reproduces(src, tmp_path / "out")
    verify_packed(tmp_path / "out")


def test_unquantized_experts_have_only_weights(sources, tmp_path):
    def dequantize_experts(t):
        for name in [n for n in t if ".switch_mlp." in n and n.endswith(".weight")]:
            base = name[: -len(".weight")]
            scales, biases = t.pop(base + ".scales"), t.pop(base + ".biases")
            t[name] = mx.dequantize(t[name], scales, biases, group_size=64, bits=4)

    src = _save_checkpoint(sources("tiny"), tmp_path / "dense", dequantize_experts)
    _repack(src, tmp_path / "out")
    entry = read_manifest(tmp_path / "out").layers[0]
    assert [(c.name, c.dtype, c.shape, c.bits) for c in entry.components] == [
        ("gate_proj.weight", "BF16", (64, 128), None),
        ("up_proj.weight", "BF16", (64, 128), None),
        ("down_proj.weight", "BF16", (128, 64), None),
    ]
    _assert_reproduces(src, tmp_path / "out")
