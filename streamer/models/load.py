"""Load an mlx-community Qwen3.5-MoE checkpoint directory as a resident ``Model``.

config.json -> ``ModelArgs``; the safetensors index (or the lone model*.safetensors files) -> tensors;
``QuantSpec`` decides which modules are quantized and how; every tensor is then assigned strictly by
its HF name: a missing, unexpected or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from streamer.errors import CheckpointError, ConfigError
from streamer.models.args import INDEX_FILE, ModelArgs, read_config_file
from streamer.models.quantization import QuantSpec
from streamer.models.qwen3_5_moe import DeltaRule, Model

log = logging.getLogger(__name__)

# Parts of multimodal / MTP checkpoints the text model does not use (mlx-lm drops them too).
IGNORED_PREFIXES = ("vision_tower", "model.visual", "mtp.", "language_model.mtp.")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_dtype() -> mx.Dtype:
    """float32 on CPU (bf16 matmuls there are slow and drift), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def load_model(
    path: str | Path, dtype: mx.Dtype | str | None = None, *, delta_rule: DeltaRule | None = None
) -> tuple[Model, ModelArgs]:
    """Loads every weight of a checkpoint into memory.

    Args:
        path: checkpoint directory (config.json, model.safetensors.index.json, shards).
        dtype: activation / compute dtype; None picks ``default_dtype()``.
        delta_rule: how DeltaNet layers run multi-token calls (see ``qwen3_5_moe.DeltaRule``); None: the
            model's default for ``dtype`` (``qwen3_5_moe.default_delta_rule``).

    Returns:
        (model with evaluated parameters, its ModelArgs).

    Raises:
        CheckpointError: missing files, missing / unexpected / mis-shaped tensors.
        ConfigError: unsupported model type or missing config fields.
    """
    path = Path(path)
    config = read_config(path)
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    dtype = _resolve_dtype(dtype)
    weights = read_weights(path)
    model = Model(args, dtype=dtype, delta_rule=delta_rule)
    spec = QuantSpec.from_config(config, {name: tuple(w.shape) for name, w in weights.items()})
    quantize_modules(model, spec)
    assign_weights(model, weights, dtype, source=path)
    mx.eval(model.parameters())
    return model, args


def read_config(path: Path) -> dict:
    return read_config_file(path, error=CheckpointError)


def read_weights(path: Path) -> dict[str, mx.array]:
    """Every text-model tensor by name (lazily loaded), from the index's shards or model*.safetensors."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.glob("model*.safetensors"))
        weight_map = {}
        if not shards:
            raise CheckpointError(f"{path}: no {INDEX_FILE} and no model*.safetensors files")
    weights: dict[str, mx.array] = {}
    for shard in shards:
        shard_file = path / shard
        if not shard_file.is_file():
            raise CheckpointError(
                f"{shard_file} is listed in {INDEX_FILE} but missing (incomplete download?)"
            )
        weights.update(mx.load(str(shard_file)))
    for name, shard in weight_map.items():
        if name not in weights:
            raise CheckpointError(
                f"{path / shard}: tensor {name} is listed in {INDEX_FILE} but not in the file"
            )
    return _text_weights(weights)


def _text_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        if name.startswith(IGNORED_PREFIXES) or ".mtp." in name:
            continue
        if name.startswith("model.language_model."):  # HF multimodal naming
            name = "language_model.model." + name[len("model.language_model.") :]
        out[name] = w
    return out


def quantize_modules(model: nn.Module, spec: QuantSpec) -> None:
    """Swaps each Linear / Embedding / ExpertLinear the checkpoint stores quantized for its quantized form."""

    def predicate(path: str, module: nn.Module) -> dict | bool:
        if not hasattr(module, "to_quantized"):
            return False
        quant = spec.quant_for(path, in_dims=module.weight.shape[-1])
        if quant is None:
            return False
        return {"group_size": quant.group_size, "bits": quant.bits, "mode": quant.mode}

    nn.quantize(model, class_predicate=predicate)


def assign_weights(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype, source: Path) -> None:
    """Replaces every parameter of ``model`` by the stored tensor of the same name, strictly."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) the model needs are missing, e.g. {missing[0]} "
            f"(expected shape {tuple(expected[missing[0]].shape)}); "
            "is this a complete Qwen3.5-MoE checkpoint?"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]} "
            f"{tuple(weights[unexpected[0]].shape)}; the checkpoint does not match its config.json"
        )
    assigned = []
    for name, placeholder in expected.items():
        w = weights[name]
        if w.shape != placeholder.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(placeholder.shape)} "
                "from config.json and its quantization"
            )
        assigned.append((name, _cast(name, w, dtype)))
    model.update(tree_unflatten(assigned))


def _cast(name: str, w: mx.array, dtype: mx.Dtype) -> mx.array:
    if not mx.issubdtype(w.dtype, mx.floating) or name.endswith("A_log"):
        return w  # packed weights; A_log stays float32 as mlx-lm keeps it
    if ".switch_mlp." in name:
        # Routed experts (scales, biases, unquantized weights) are held in the dtype the kernels compute
        # in, as the streamed slots are (see experts/expert_cache.py): gather_qmm / gather_mm otherwise
        # convert the whole stacked tensor on every call. Widening is exact; narrowing never happens.
        return w.astype(mx.result_type(w.dtype, dtype))
    # Everything else, quantization scales and biases included, in the compute dtype: widening bf16 scales
    # to f32 is exact, spares the quantized kernels a conversion on every call, and makes the quantized
    # embedding dequantize in f32 (kept in bf16 it rounded the f32 run of a bf16 checkpoint away from the
    # same checkpoint widened to f32: tokens diverged within 5 steps on random weights).
    return w.astype(dtype)


def _resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype
