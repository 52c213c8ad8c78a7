"""Synthetic Qwen3.5-MoE checkpoints in the exact mlx-community layout, deterministic from a seed.

The project cannot download models, so it makes its own: random float weights are quantized with
``mx.quantize`` exactly as ``mlx_lm.convert`` does (cast to the checkpoint dtype, then affine
quantization per module recipe) and written as sharded safetensors with an index, config.json with
``text_config`` and a ``quantization`` dict, tokenizer files and a chat template.

Every tensor is generated from ``(seed, tensor name[, expert])`` alone and written in place at its final
offset, so a full-width checkpoint of tens of GB streams to disk one expert at a time.

Names: E = experts, I = expert intermediate size, H = hidden size, V = vocab size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from streamer.storage.safetensors_file import SafetensorsWriter, tensor_nbytes
from streamer.synthetic.params import Param, _keeps_f32, _rng, float_value, plan_params, quant_params_for
from streamer.synthetic.presets import Preset, get_preset
from streamer.text.tokenizer_assets import write_tokenizer_files

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB


# ----------------------------------------------------------------------------------------------------
# The module plan: every parameter of the model, its float shape and how it is initialised.


# ----------------------------------------------------------------------------------------------------
# Values.


_SAFETENSORS_DTYPE = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16", mx.uint32: "U32"}


def _to_bytes(a: mx.array) -> memoryview:
    # numpy has no bfloat16: view 2-byte floats as uint16 to get their bits.
    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(a))).cast("B")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


def tensor_specs(param: Param, q: dict | None, dtype: mx.Dtype) -> list[TensorSpec]:
    """The stored tensors of one parameter: the weight, or weight/scales/biases when quantized."""
    fdt = "F32" if _keeps_f32(param.name) else _SAFETENSORS_DTYPE[dtype]
    if q is None:
        return [TensorSpec(param.name, fdt, param.shape)]
    *lead, in_dim = param.shape
    base = param.name[: -len(".weight")]
    return [
        TensorSpec(f"{base}.weight", "U32", (*lead, in_dim * q["bits"] // 32)),
        TensorSpec(f"{base}.scales", fdt, (*lead, in_dim // q["group_size"])),
        TensorSpec(f"{base}.biases", fdt, (*lead, in_dim // q["group_size"])),
    ]


# Supplies float weights to write: (param, expert index or None) -> f32 array of that (slice's) shape.
ValueFn = Callable[[Param, "int | None"], np.ndarray]


def _stored_pieces(
    param: Param,
    q: dict | None,
    dtype: mx.Dtype,
    seed: int,
    values: str = "float",
    value_fn: ValueFn | None = None,
) -> Iterator[tuple[int, list]]:
    """Yields (expert index or -1, [bytes per stored tensor]) in the order of ``tensor_specs``."""
    experts = range(param.experts) if param.experts else [None]
    for e in experts:
        if q is not None and values == "codes" and value_fn is None:
            parts = _random_codes(param, q, dtype, seed, e)
        else:
            w = mx.array(value_fn(param, e) if value_fn else float_value(param, seed, e))
            if not _keeps_f32(param.name):
                w = w.astype(dtype)
            parts = [w] if q is None else list(mx.quantize(w, group_size=q["group_size"], bits=q["bits"]))
        mx.eval(parts)
        yield (-1 if e is None else e), [_to_bytes(a) for a in parts]


def _random_codes(param: Param, q: dict, dtype: mx.Dtype, seed: int, expert: int | None) -> list[mx.array]:
    """Uniform random quantized codes with scales/biases centring them: weights uniform in ±(levels/2)·s.

    s is chosen so the weight std matches ``float_value``'s 1/sqrt(in) (embeddings: 1).
    """
    *_, out_dim, in_dim = param.shape
    rng = _rng(seed, param.name, 0 if expert is None else expert + 1)
    words = rng.integers(0, 1 << 32, size=(out_dim, in_dim * q["bits"] // 32), dtype=np.uint32)
    levels = (1 << q["bits"]) - 1
    std = 1.0 if param.init == "embed" else 1.0 / np.sqrt(in_dim)
    step = std / np.sqrt(levels * (levels + 2) / 12)  # std of a uniform over levels+1 values
    groups = (out_dim, in_dim // q["group_size"])
    scales = (step * (1 + 0.1 * rng.standard_normal(groups))).astype(np.float32)
    biases = -scales * levels / 2
    return [mx.array(words), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype)]


# ----------------------------------------------------------------------------------------------------
# Writing.


def make_config(preset: Preset, dtype: mx.Dtype) -> dict:
    """config.json as mlx-lm's converter saves it: sorted keys, quantization copied to quantization_config."""
    tc = dict(preset.text_config)
    dtype_name = "float32" if dtype == mx.float32 else "bfloat16"
    tc["dtype"] = dtype_name
    quantization: dict = {"group_size": 64, "bits": preset.bits, "mode": "affine"}
    for p in plan_params(tc):
        q = quant_params_for(p, preset.recipe)
        # mlx-lm records a module when its predicate returns explicit parameters: the 8-bit gates
        # always, other modules when they differ from the defaults.
        is_gate = p.module.endswith("mlp.gate") or p.module.endswith("shared_expert_gate")
        if q is not None and (is_gate or q["bits"] != preset.bits or q["group_size"] != 64):
            quantization[p.module] = q
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": tc,
        "tie_word_embeddings": tc["tie_word_embeddings"],
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "transformers_version": "4.57.0.dev0",
        "quantization": quantization,
        "quantization_config": quantization,
    }
    return dict(sorted(config.items()))


def _assign_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = []
    size = 0
    for s in sorted(specs, key=lambda s: s.name):
        nbytes = tensor_nbytes(s.dtype, s.shape)
        if not shards or size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def generate(
    dst: str | Path,
    preset: str | Preset = "tiny",
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    num_layers: int | None = None,
    max_shard_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    value_fn: ValueFn | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Writes a synthetic mlx-community checkpoint to ``dst`` (which must not exist yet).

    The checkpoint appears under its final name only when complete: it is built in ``dst.partial``
    and renamed at the end.

    Args:
        dst: output directory.
        preset: a preset name (see ``PRESETS`` and ``full-width``) or a ``Preset``.
        dtype: "bfloat16" (as published) or "float32" (for exact comparisons on CPU).
        seed: every value derives from the seed and the tensor's name.
        num_layers: override the preset's layer count.
        max_shard_bytes: shard size (defaults to mlx-lm's 5 GB; small values give multi-shard tests).
        progress: called with (bytes written, total bytes).
        value_fn: float weights to export instead of random ones (e.g. a trained model), by param
            and expert; quantized with the preset's recipe exactly like random ones.
        tokenizer_dir: copy tokenizer.json, tokenizer_config.json and chat_template.jinja from here
            instead of writing the preset's tokenizer.

    Returns:
        The checkpoint directory.
    """
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory or delete it first")
    if isinstance(preset, str):
        preset = get_preset(preset, num_layers)
    mx_dtype = {"bfloat16": mx.bfloat16, "float32": mx.float32}.get(dtype)
    if mx_dtype is None:
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")

    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        from tokenizers import Tokenizer

        n_tokens = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    else:
        n_tokens = write_tokenizer_files(tmp, preset.tokenizer)
    if n_tokens > preset.text_config["vocab_size"]:
        raise ValueError(
            f"tokenizer has {n_tokens} tokens but vocab_size is {preset.text_config['vocab_size']}"
        )

    config = make_config(preset, mx_dtype)
    params = plan_params(config["text_config"])
    quant = {p.name: quant_params_for(p, preset.recipe) for p in params}
    specs = {p.name: tensor_specs(p, quant[p.name], mx_dtype) for p in params}
    all_specs = [s for ss in specs.values() for s in ss]
    shards = _assign_shards(all_specs, max_shard_bytes or MAX_SHARD_BYTES)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = {}
    for shard_name, shard in zip(names, shards, strict=True):
        f = SafetensorsWriter(tmp / shard_name, {s.name: (s.dtype, s.shape) for s in shard})
        files.update({s.name: f for s in shard})

    total = sum(tensor_nbytes(s.dtype, s.shape) for s in all_specs)
    done = 0
    for p in params:
        for expert, pieces in _stored_pieces(p, quant[p.name], mx_dtype, seed, preset.values, value_fn):
            for spec, data in zip(specs[p.name], pieces, strict=True):
                offset = max(expert, 0) * len(data)
                files[spec.name].write(spec.name, offset, data)
                done += len(data)
            if progress:
                progress(done, total)
    for f in {id(f): f for f in files.values()}.values():
        f.close()

    index = {
        "metadata": {"total_size": total, "total_parameters": _count_parameters(params)},
        "weight_map": {s.name: names[i] for i, shard in enumerate(shards) for s in shard},
    }
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (tmp / "config.json").write_text(json.dumps(config, indent=4))
    (tmp / "generation_config.json").write_text(
        json.dumps({**_generation_config(tmp), **preset.generation}, indent=2)
    )
    (tmp / "synthetic.json").write_text(
        json.dumps(
            {"preset": preset.name, "seed": seed, "dtype": dtype, "fingerprint": _fingerprint(config, seed)}
        )
    )
    tmp.rename(dst)
    return dst


def _count_parameters(params: list[Param]) -> int:
    return int(sum(np.prod(p.shape) for p in params))


def _fingerprint(config: dict, seed: int) -> str:
    return hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:16]


def _generation_config(ckpt: Path) -> dict:
    # Qwen3.5 model-card sampling defaults (thinking mode); end-of-turn and end-of-text stop generation.
    vocab = {t["content"]: t["id"] for t in json.loads((ckpt / "tokenizer.json").read_text())["added_tokens"]}
    eos = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    return {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": eos}


def checkpoint_bytes(preset: Preset, dtype: str = "bfloat16") -> int:
    """Total tensor bytes a preset writes, without writing it (for --dry-run and disk checks)."""
    mx_dtype = mx.float32 if dtype == "float32" else mx.bfloat16
    total = 0
    for p in plan_params(preset.text_config):
        for s in tensor_specs(p, quant_params_for(p, preset.recipe), mx_dtype):
            total += tensor_nbytes(s.dtype, s.shape)
    return total
