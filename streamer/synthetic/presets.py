"""Synthetic checkpoint presets: the shapes and quantization recipes of the model family streamer targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "language_model.model"  # where mlx-community checkpoints keep the text model's tensors

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
    # Extra generation_config.json keys: how the model wants to be run (the demos cannot think).
    generation: dict = field(default_factory=dict)


# A model this small writes code-like text, not reasoning: no thinking, short answers.
DEMO_GENERATION = {"enable_thinking": False, "max_new_tokens": 256}


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
            "random-weight fallback of the demo: real Qwen3.5 vocabulary, 8 layers, 64 experts top-8",
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
            generation=DEMO_GENERATION,
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
