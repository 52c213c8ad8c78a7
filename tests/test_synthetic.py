"""Synthetic checkpoints are what mlx-lm's converter writes, byte for byte, and load in mlx-lm.

The reference side runs mlx-lm's own pipeline on the same float weights: its Qwen3.5-MoE module,
the converter's dtype cast (with its cast_predicate), `quantize_model` with the equivalent
predicate, and `save_config`.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from streamer.storage.safetensors_file import read_header
from streamer.synthetic.params import float_weights
from streamer.synthetic.presets import PRESETS, get_preset
from streamer.synthetic.writer import generate, make_config

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.qwen3_5_moe import Model, ModelArgs  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402


def _mlx_lm_predicate(preset):
    """The preset's recipe in mlx-lm's quant_predicate form (dict = recorded override)."""
    default = {"group_size": 64, "bits": preset.bits}

    def predicate(path, module):
        q = preset.recipe(path)
        if q is None:
            return False
        is_gate = path.endswith("mlp.gate") or path.endswith("shared_expert_gate")
        return q if (is_gate or q != default) else True

    return predicate


def _reference_conversion(preset, dtype, seed=0):
    """mlx-lm's convert pipeline from our float weights: returns (tensors by name, quantization dict)."""
    config = make_config(preset, dtype)
    config.pop("quantization")
    config.pop("quantization_config")
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in float_weights(preset, seed).items()], strict=True)
    cast = model.cast_predicate

    def set_dtype(k, v):
        return v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(set_dtype, model.parameters()))
    model, qconfig = quantize_model(
        model, config, 64, preset.bits, mode="affine", quant_predicate=_mlx_lm_predicate(preset)
    )
    return dict(tree_flatten(model.parameters())), qconfig["quantization"]


def _load_all(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(ckpt / shard)))
    return out, index


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "demo"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_preset_matches_mlx_lm_converter(tmp_path, name, dtype):
    if dtype == "bfloat16" and name not in ("tiny", "mixed"):
        pytest.skip("bf16 checked on tiny and mixed; the other presets differ only in shapes")
    preset = get_preset(name)
    ckpt = generate(tmp_path / name, preset, dtype=dtype, seed=3, max_shard_bytes=1 << 20)
    ours, index = _load_all(ckpt)
    ref, ref_quant = _reference_conversion(preset, getattr(mx, dtype), seed=3)

    assert sorted(ours) == sorted(ref), "tensor names differ from mlx-lm's converter"
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert ours[k].shape == ref[k].shape, k
        assert mx.array_equal(ours[k], ref[k]).item(), f"{k}: bytes differ from mlx-lm's quantization"

    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"] == ref_quant
    assert config["quantization_config"] == ref_quant
    assert config["model_type"] == "qwen3_5_moe"
    assert list(config) == sorted(config), "mlx-lm's save_config writes sorted keys"
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())


def test_multi_shard_layout(tmp_path):
    ckpt = generate(tmp_path / "t", "tiny", max_shard_bytes=256 << 10)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for shard in shards:
        tensors, meta = read_header(ckpt / shard)
        assert meta == {"format": "mlx"}
        assert all(index["weight_map"][n] == shard for n in tensors)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ckpt / f).is_file(), f


def test_shard_header_matches_mx_save_safetensors(tmp_path):
    """Our streaming writer produces the header mx.save_safetensors would (data order aside)."""
    ckpt = generate(tmp_path / "t", "tiny", dtype="bfloat16")
    shard = next(ckpt.glob("*.safetensors"))
    arrays = mx.load(str(shard))
    mx.save_safetensors(str(tmp_path / "ref.safetensors"), arrays, metadata={"format": "mlx"})

    def header(path):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + n]), raw[8 : 8 + n], raw[8 + n :]

    ours, ours_raw, ours_data = header(shard)
    ref, ref_raw, ref_data = header(tmp_path / "ref.safetensors")
    for parsed, raw in ((ours, ours_raw), (ref, ref_raw)):  # both compact JSON, keys in written order
        assert json.dumps(parsed, separators=(",", ":")).encode() == raw
    assert ours.keys() == ref.keys()
    for name, entry in ref.items():
        if name == "__metadata__":
            assert ours[name] == entry
            continue
        assert list(ours[name]) == list(entry)
        assert (ours[name]["dtype"], ours[name]["shape"]) == (entry["dtype"], entry["shape"])
        a, b = ours[name]["data_offsets"], entry["data_offsets"]
        assert ours_data[a[0] : a[1]] == ref_data[b[0] : b[1]], name


def test_deterministic_from_seed(tmp_path):
    a = generate(tmp_path / "a", "like-35b", seed=7)
    b = generate(tmp_path / "b", "like-35b", seed=7)
    c = generate(tmp_path / "c", "like-35b", seed=8)
    shard = "model-00001-of-00001.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


@pytest.mark.parametrize("name", ["tiny", "reap", "mixed"])
def test_loads_and_runs_in_mlx_lm(tmp_path, name):
    ckpt = generate(tmp_path / name, name, dtype="float32")
    model, tokenizer = mlx_lm.load(str(ckpt))
    ids = tokenizer.encode("Hello, world!")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), get_preset(name).text_config["vocab_size"])
    assert np.isfinite(np.array(logits)).all()


def test_full_width_streams_expert_by_expert(tmp_path, monkeypatch):
    """Full-width shapes are right without materialising them: shrink the expert count via the plan."""
    preset = get_preset("full-width", num_layers=1)
    tc = preset.text_config
    assert (tc["hidden_size"], tc["num_experts"], tc["moe_intermediate_size"]) == (4096, 512, 1024)
    from streamer.synthetic.params import plan_params, quant_params_for
    from streamer.synthetic.writer import checkpoint_bytes, tensor_specs

    per_expert = 0
    for p in plan_params(tc):
        if p.experts:
            for s in tensor_specs(p, quant_params_for(p, preset.recipe), mx.bfloat16):
                per_expert += int(np.prod(s.shape[1:])) * (4 if s.dtype == "U32" else 2)
    assert per_expert == 7_077_888  # one Qwen3.5-397B 4-bit expert (formats/PACKED.md)
    assert checkpoint_bytes(preset) > 512 * per_expert


def test_generate_refuses_existing_dst(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        generate(tmp_path / "x", "tiny")


def test_codes_mode_gives_a_sane_model(tmp_path):
    """Full-width checkpoints draw quantized codes directly: same layout, weight std near 1/sqrt(in)."""
    import dataclasses

    preset = dataclasses.replace(get_preset("like-35b"), values="codes")
    ckpt = generate(tmp_path / "codes", preset, dtype="float32")
    tensors, _ = _load_all(ckpt)
    ref = generate(tmp_path / "float", "like-35b", dtype="float32")
    ref_tensors, _ = _load_all(ref)
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in ref_tensors.items()
    }
    base = "language_model.model.layers.1.mlp.switch_mlp.up_proj"
    w = mx.dequantize(tensors[f"{base}.weight"], tensors[f"{base}.scales"], tensors[f"{base}.biases"])
    assert abs(np.std(np.array(w)) * np.sqrt(w.shape[-1]) - 1.0) < 0.1
    assert abs(float(np.mean(np.array(w)))) < 0.01
    model, tokenizer = mlx_lm.load(str(ckpt))
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


def test_value_fn_exports_given_weights_with_the_same_recipe(tmp_path):
    """Trained weights go through the same quantization path: feeding the seed's values reproduces it."""
    from streamer.synthetic.params import float_value

    ref = generate(tmp_path / "ref", "tiny", seed=4)
    doubled = generate(tmp_path / "x2", "tiny", seed=4, value_fn=lambda p, e: float_value(p, 4, e))
    same = generate(
        tmp_path / "same", "tiny", seed=99, value_fn=lambda p, e: float_value(p, 4, e), tokenizer_dir=ref
    )
    shard = "model-00001-of-00001.safetensors"
    assert (ref / shard).read_bytes() == (doubled / shard).read_bytes() == (same / shard).read_bytes()
    assert (same / "tokenizer.json").read_text() == (ref / "tokenizer.json").read_text()
