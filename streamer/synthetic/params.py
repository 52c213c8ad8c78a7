"""The parameter plan of a synthetic checkpoint: every tensor of the model, its float shape, how it is
quantized and its deterministic random value (from the seed and the tensor name alone).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from streamer.synthetic.presets import PREFIX, Preset, Recipe


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
