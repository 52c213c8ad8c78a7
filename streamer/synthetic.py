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
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .safetensors_file import SafetensorsWriter, tensor_nbytes
from .tokenizer_assets import write_tokenizer_files

log = logging.getLogger(__name__)

PREFIX = "language_model.model"
MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB

# Quantization recipe: module path -> {"bits", "group_size"} or None to leave it unquantized.
Recipe = Callable[[str], "dict | None"]


def _default_recipe(bits: int = 4) -> Recipe:
    """mlx-lm's Qwen3.5-MoE predicate: routers and shared-expert gates at 8 bits, the rest at ``bits``."""

    def recipe(path: str) -> dict | None:
        if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
            return {"group_size": 64, "bits": 8}
        return {"group_size": 64, "bits": bits}

    return recipe


def _mixed_recipe(path: str) -> dict | None:
    """Unsloth-dynamic-like: attention 8-bit, down projections 6-bit, layer 0 experts 3-bit, a few bf16."""
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}
    if path.endswith("in_proj_a") or path.endswith("in_proj_b"):
        return None  # kept in full precision, as dynamic recipes do for tiny sensitive projections
    if ".self_attn." in path:
        return {"group_size": 64, "bits": 8}
    if path.endswith("down_proj"):
        return {"group_size": 64, "bits": 6}
    if path.startswith(f"{PREFIX}.layers.0.mlp.switch_mlp."):
        return {"group_size": 64, "bits": 3}
    if path.endswith("linear_attn.out_proj"):
        return {"group_size": 32, "bits": 5}
    if path == "language_model.lm_head":
        return {"group_size": 64, "bits": 6}
    if path.endswith("embed_tokens"):
        return {"group_size": 64, "bits": 2}
    return {"group_size": 64, "bits": 4}


def _text_config(**overrides) -> dict:
    """A small Qwen3.5-MoE text config; every preset starts here."""
    config = {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": 576,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "max_position_embeddings": 262144,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    }
    config.update(overrides)
    n, interval = config["num_hidden_layers"], config["full_attention_interval"]
    config["layer_types"] = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    return config


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    text_config: dict
    recipe: Recipe = field(default_factory=_default_recipe)
    tokenizer: str = "small"
    bits: int = 4  # the global default written in config["quantization"]
    # "float": quantize random float weights as mlx_lm.convert would (tests compare bytes with it);
    # "codes": draw quantized codes directly (~50x faster; for full-width checkpoints of tens of GB).
    values: str = "float"


def _full_width_config(num_layers: int, vocab_size: int = 248320) -> dict:
    return _text_config(
        hidden_size=4096,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        vocab_size=vocab_size,
        linear_num_value_heads=64,
        linear_num_key_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", "4 layers, 16 experts top-4; seconds to build, for tests", _text_config()),
        Preset(
            "like-397b",
            "397B-like routing: 128 experts top-10 (+1 shared)",
            _text_config(num_experts=128, num_experts_per_tok=10),
        ),
        Preset(
            "like-35b",
            "35B-A3B-like routing: 64 experts top-8 (+1 shared)",
            _text_config(num_experts=64, num_experts_per_tok=8),
        ),
        Preset(
            "reap",
            "REAP-pruned 35B-like: 54 of 64 experts kept (not a power of two), top-8",
            _text_config(num_experts=54, num_experts_per_tok=8),
        ),
        Preset(
            "mixed",
            "Unsloth-dynamic-like recipe: 2/3/4/5/6/8-bit modules and unquantized ones",
            _text_config(num_experts=64, num_experts_per_tok=8),
            recipe=_mixed_recipe,
        ),
        Preset(
            "demo",
            "the embedded default: real Qwen3.5 vocabulary, 8 layers, 64 experts top-8",
            _text_config(
                hidden_size=256,
                num_hidden_layers=8,
                head_dim=64,
                vocab_size=248320,
                linear_key_head_dim=64,
                linear_value_head_dim=64,
                num_experts=64,
                num_experts_per_tok=8,
                moe_intermediate_size=128,
                shared_expert_intermediate_size=256,
            ),
            tokenizer="qwen3_5",
        ),
        Preset(
            "q8",
            "8-bit everything, 64 experts top-8",
            _text_config(num_experts=64, num_experts_per_tok=8),
            recipe=_default_recipe(8),
            bits=8,
        ),
    ]
}

FULL_WIDTH = "full-width"


def get_preset(name: str, num_layers: int | None = None, vocab_size: int | None = None) -> Preset:
    """Looks up a preset; ``full-width`` (real 397B dimensions) takes its layer count from ``num_layers``.

    ``vocab_size`` (full-width only) shrinks the embedding and output head, e.g. so a CPU benchmark
    measures the layers rather than a 248k-row lm_head.
    """
    if name == FULL_WIDTH:
        return Preset(
            FULL_WIDTH,
            "real Qwen3.5-397B-A17B dimensions (hidden 4096, 512 experts top-10, inter 1024)",
            _full_width_config(num_layers or 4, vocab_size or 248320),
            tokenizer="small",
            values="codes",
        )
    if vocab_size is not None:
        raise ValueError("vocab_size can only be set for the full-width preset")
    if name not in PRESETS:
        known = ", ".join([*PRESETS, FULL_WIDTH])
        raise ValueError(f"unknown preset {name!r}; choose one of: {known}")
    preset = PRESETS[name]
    if num_layers is not None:
        preset = Preset(
            preset.name,
            preset.description,
            _text_config(**{**preset.text_config, "num_hidden_layers": num_layers}),
            preset.recipe,
            preset.tokenizer,
            preset.bits,
        )
    return preset


# ----------------------------------------------------------------------------------------------------
# The module plan: every parameter of the model, its float shape and how it is initialised.


@dataclass(frozen=True)
class Param:
    """One float parameter before quantization. ``experts`` > 0 marks a stacked [E, out, in] tensor."""

    name: str  # full tensor name, e.g. language_model.model.layers.0.mlp.gate.weight
    shape: tuple[int, ...]
    init: str  # "linear", "embed", "norm", "conv", "a_log", "dt_bias"
    quantizable: bool = False  # a Linear / Embedding / SwitchLinear weight
    experts: int = 0

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def plan_params(tc: dict) -> list[Param]:
    """All parameters of the mlx-lm Qwen3.5-MoE model for text config ``tc``, in module order."""
    H, V = tc["hidden_size"], tc["vocab_size"]
    params = [Param(f"{PREFIX}.embed_tokens.weight", (V, H), "embed", quantizable=True)]
    for i in range(tc["num_hidden_layers"]):
        params += _layer_params(tc, i)
    params.append(Param(f"{PREFIX}.norm.weight", (H,), "norm"))
    if not tc["tie_word_embeddings"]:
        params.append(Param("language_model.lm_head.weight", (V, H), "linear", quantizable=True))
    return params


def _linear(name: str, out_dim: int, in_dim: int) -> Param:
    return Param(f"{name}.weight", (out_dim, in_dim), "linear", quantizable=True)


def _layer_params(tc: dict, i: int) -> list[Param]:
    H = tc["hidden_size"]
    p = f"{PREFIX}.layers.{i}"
    params = [Param(f"{p}.input_layernorm.weight", (H,), "norm")]
    if (i + 1) % tc["full_attention_interval"] != 0:
        key_dim = tc["linear_num_key_heads"] * tc["linear_key_head_dim"]
        value_dim = tc["linear_num_value_heads"] * tc["linear_value_head_dim"]
        conv_dim = 2 * key_dim + value_dim
        nv = tc["linear_num_value_heads"]
        a = f"{p}.linear_attn"
        params += [
            Param(f"{a}.A_log", (nv,), "a_log"),
            Param(f"{a}.conv1d.weight", (conv_dim, tc["linear_conv_kernel_dim"], 1), "conv"),
            Param(f"{a}.dt_bias", (nv,), "dt_bias"),
            _linear(f"{a}.in_proj_a", nv, H),
            _linear(f"{a}.in_proj_b", nv, H),
            _linear(f"{a}.in_proj_qkv", conv_dim, H),
            _linear(f"{a}.in_proj_z", value_dim, H),
            Param(f"{a}.norm.weight", (tc["linear_value_head_dim"],), "norm"),
            _linear(f"{a}.out_proj", H, value_dim),
        ]
    else:
        heads, kv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
        s = f"{p}.self_attn"
        params += [
            _linear(f"{s}.k_proj", kv * hd, H),
            Param(f"{s}.k_norm.weight", (hd,), "norm"),
            _linear(f"{s}.o_proj", H, heads * hd),
            _linear(f"{s}.q_proj", 2 * heads * hd, H),  # query and output gate, interleaved per head
            Param(f"{s}.q_norm.weight", (hd,), "norm"),
            _linear(f"{s}.v_proj", kv * hd, H),
        ]
    E, I, S = tc["num_experts"], tc["moe_intermediate_size"], tc["shared_expert_intermediate_size"]
    m = f"{p}.mlp"
    params += [
        _linear(f"{m}.gate", E, H),
        _linear(f"{m}.shared_expert.down_proj", H, S),
        _linear(f"{m}.shared_expert.gate_proj", S, H),
        _linear(f"{m}.shared_expert.up_proj", S, H),
        _linear(f"{m}.shared_expert_gate", 1, H),
        Param(f"{m}.switch_mlp.down_proj.weight", (E, H, I), "linear", True, E),
        Param(f"{m}.switch_mlp.gate_proj.weight", (E, I, H), "linear", True, E),
        Param(f"{m}.switch_mlp.up_proj.weight", (E, I, H), "linear", True, E),
        Param(f"{p}.post_attention_layernorm.weight", (H,), "norm"),
    ]
    return params


def quant_params_for(param: Param, recipe: Recipe, default_group_size: int = 64) -> dict | None:
    """The quantization a module gets, with mlx-lm's rule that input dims must divide the group size."""
    if not param.quantizable or param.shape[-1] % default_group_size != 0:
        return None
    q = recipe(param.module)
    if q is not None and param.shape[-1] % q["group_size"] != 0:
        raise ValueError(f"{param.module}: input dim {param.shape[-1]} not a multiple of {q}")
    return q


# ----------------------------------------------------------------------------------------------------
# Values.


def _rng(seed: int, name: str, expert: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), expert])


def float_value(param: Param, seed: int, expert: int | None = None) -> np.ndarray:
    """The f32 value of ``param`` (one expert's [out, in] slice when ``expert`` is given)."""
    shape = param.shape[1:] if expert is not None else param.shape
    rng = _rng(seed, param.name, 0 if expert is None else expert + 1)
    if param.init == "linear":
        std = 1.0 / np.sqrt(shape[-1])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if param.init == "embed":
        return rng.standard_normal(shape, dtype=np.float32)
    if param.init == "norm":
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if param.init == "conv":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5)
    if param.init == "a_log":
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if param.init == "dt_bias":
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    raise AssertionError(param.init)


def float_weights(preset: Preset, seed: int = 0) -> dict[str, np.ndarray]:
    """Every parameter as f32 numpy (stacked experts whole). For small presets and tests only."""
    out = {}
    for p in plan_params(preset.text_config):
        if p.experts:
            out[p.name] = np.stack([float_value(p, seed, e) for e in range(p.experts)])
        else:
            out[p.name] = float_value(p, seed)
    return out


def _keeps_f32(name: str) -> bool:
    # mlx-lm's cast_predicate for Qwen3.5: A_log stays float32 when the model is cast.
    return name.endswith("A_log")


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
    (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tmp), indent=2))
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
