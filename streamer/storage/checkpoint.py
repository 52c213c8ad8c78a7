"""Source checkpoints in the mlx-community layout: config + index + safetensors headers, checked.

``load_checkpoint`` reads headers only. It maps every tensor name to where its bytes live and checks
the checkpoint is complete, and typed and shaped as its config says, so that repack can copy byte
ranges and fails before writing anything when the input is wrong.

Names: E = experts in a layer, H = hidden size, I = expert intermediate size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import CheckpointError, ConfigError
from streamer.models.args import INDEX_FILE, MODEL_TYPES, ModelArgs, read_config_file
from streamer.models.quantization import Quant, QuantSpec
from streamer.storage.safetensors_file import TensorInfo, read_header

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
KINDS = ("weight", "scales", "biases")
FLOAT_DTYPES = ("F32", "F16", "BF16")
STORED_DTYPES = (*FLOAT_DTYPES, "U32", "U8")  # U32: packed quantized weights, U8: mx* mode scales
# Small files a model needs next to its weights (tokenizer, templates, configs), copied by repack.
EXTRA_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")

_HF_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")
_WANTED = "give the directory of an mlx-community Qwen3.5 MoE checkpoint (config.json, *.safetensors)"
_REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class ExpertProjection:
    """One stacked projection of a layer's routed experts, e.g. ``switch_mlp.gate_proj``."""

    name: str  # gate_proj, up_proj or down_proj
    module: str  # full module path, the key of per-module quantization overrides
    quant: Quant | None  # None: unquantized (weight only)
    tensors: dict[str, TensorInfo]  # kind (weight/scales/biases) -> stacked [E, ...] tensor


@dataclass(frozen=True)
class Checkpoint:
    """A validated source checkpoint: every tensor located, experts described per layer."""

    path: Path
    config: dict
    config_sha256: str
    tensors: dict[str, TensorInfo]
    experts: tuple[dict[str, ExpertProjection], ...]  # per layer: projection name -> projection
    num_experts: tuple[int, ...]  # per layer, from the tensors (pruned checkpoints may differ)
    extra_files: tuple[Path, ...]

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    def expert_tensor_names(self) -> set[str]:
        return {t.name for layer in self.experts for proj in layer.values() for t in proj.tensors.values()}

    def resident_tensors(self) -> list[TensorInfo]:
        """Every tensor except routed experts, sorted by name."""
        experts = self.expert_tensor_names()
        return [self.tensors[n] for n in sorted(self.tensors) if n not in experts]

    def fingerprint(self) -> str:
        """Identifies the weights without reading them all: names, dtypes, shapes, and a sample of
        each shard's data (so two fine-tunes with the same config still differ)."""
        h = hashlib.sha256(self.config_sha256.encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|{t.nbytes}\n".encode())
        for path in sorted({t.path for t in self.tensors.values()}):
            first = min(t.offset for t in self.tensors.values() if t.path == path)
            with open(path, "rb") as f:
                f.seek(first)
                h.update(zlib.crc32(f.read(1 << 16)).to_bytes(4, "little"))
        return h.hexdigest()[:32]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and validates an mlx-community checkpoint directory (headers only).

    Raises:
        CheckpointError: naming the file, tensor or config key that is missing or inconsistent.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config_path = path / "config.json"
    if (path / "manifest.json").is_file() and (path / "resident.safetensors").is_file():
        raise CheckpointError(f"{path} is already a packed model: use it directly (streamer info {path})")
    if not config_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no config.json); {_WANTED}")
    raw_config = config_path.read_bytes()
    config = read_config_file(path, fix="re-download config.json", error=CheckpointError)
    _check_config(config, config_path)
    tensors = _read_tensors(path)
    if any(_HF_PER_EXPERT.search(n) for n in tensors):
        raise CheckpointError(
            f"{path}: experts are stored one tensor per expert (an original Hugging Face checkpoint); "
            "streamer reads mlx-community checkpoints: convert it with mlx_lm.convert first"
        )
    try:
        experts, counts = _check_tensors(config, tensors, path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; the tensors do not match config.json: download the checkpoint again "
            "(or convert it with mlx_lm.convert)"
        ) from None
    extra = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix in EXTRA_SUFFIXES and p.name != INDEX_FILE and not p.name.startswith(".")
    )
    return Checkpoint(
        path=path,
        config=config,
        config_sha256=hashlib.sha256(raw_config).hexdigest(),
        tensors=tensors,
        experts=tuple(experts),
        num_experts=tuple(counts),
        extra_files=tuple(extra),
    )


def _check_tensors(config: dict, tensors: dict[str, TensorInfo], path: Path) -> tuple[list, list]:
    """Dtypes, required modules and expert tensors against the config; (experts, counts) per layer."""
    for t in tensors.values():
        if t.dtype not in STORED_DTYPES:
            raise CheckpointError(f"{t.path}: tensor '{t.name}' has unexpected dtype {t.dtype}")
    tc = config.get("text_config") or config
    prefix = _text_prefix(tensors, path)
    _check_required(tensors, tc, prefix, path)
    quant = config.get("quantization") or config.get("quantization_config") or {}
    experts, counts = [], []
    for i in range(tc["num_hidden_layers"]):
        layer = {
            p: _expert_projection(tensors, tc, quant, f"{prefix}layers.{i}.mlp.switch_mlp.{p}", path)
            for p in PROJECTIONS
        }
        counts.append(_layer_expert_count(tensors, layer, tc, prefix, i))
        experts.append(layer)
    return experts, counts


def _check_config(config: dict, config_path: Path) -> None:
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path}: must hold a JSON object, got {type(config).__name__}; re-download config.json"
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: unsupported model_type {model_type!r}; streamer runs "
            f"{', '.join(MODEL_TYPES)} (Qwen3.5 mixture-of-experts) checkpoints"
        )
    tc = config.get("text_config") or config
    if not isinstance(tc, dict):
        raise CheckpointError(f"{config_path}: text_config must be an object; re-download config.json")
    missing = [k for k in _REQUIRED_CONFIG if not isinstance(tc.get(k), int)]
    if missing:
        raise CheckpointError(
            f"{config_path}: missing or non-integer {', '.join(missing)} (a Qwen3.5 MoE config.json has "
            "them under text_config or at the top level); re-download config.json"
        )
    try:  # everything the runtime will need, checked now rather than after hours of copying
        ModelArgs.from_dict(config, source=str(config_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _read_tensors(path: Path) -> dict[str, TensorInfo]:
    index_path = path / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{index_path}: not a safetensors index ({e!r}); download it again"
            ) from None
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if not (path / name).is_file():
                raise CheckpointError(
                    f"{path}: shard {name} named in {INDEX_FILE} is missing (incomplete download?); "
                    "download it again"
                )
        shards = [path / n for n in shard_names]
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: not a checkpoint (no *.safetensors files); {_WANTED}")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        try:
            header = read_header(shard)[0]
        except CheckpointError as e:
            raise CheckpointError(f"{e}; download {shard.name} again") from None
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(
                    f"{path}: tensor '{name}' is in both {tensors[name].path.name} and {shard.name}"
                )
            tensors[name] = info
    for name, shard in (weight_map or {}).items():
        if name not in tensors or tensors[name].path.name != shard:
            raise CheckpointError(
                f"{path}: {INDEX_FILE} places tensor '{name}' in {shard}, which does not hold it; "
                "the index and the shards are from different downloads: download both again"
            )
    return tensors


def _text_prefix(tensors: dict[str, TensorInfo], path: Path) -> str:
    """The name prefix of the text model's modules, e.g. ``language_model.model.``."""
    embeds = [n for n in tensors if n.endswith("embed_tokens.weight") and "vision" not in n]
    if len(embeds) != 1:
        raise CheckpointError(f"{path}: expected one embed_tokens.weight tensor, found {len(embeds)}")
    return embeds[0][: -len("embed_tokens.weight")]


def _check_required(tensors: dict[str, TensorInfo], tc: dict, prefix: str, path: Path) -> None:
    """Every non-expert module the config implies must be present (experts are checked separately)."""
    head = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
    names = [f"{prefix}embed_tokens.weight", f"{prefix}norm.weight"]
    if not tc.get("tie_word_embeddings", False):
        names.append(f"{head}lm_head.weight")
    interval = tc.get("full_attention_interval", 1)
    for i in range(tc["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        mods = ["input_layernorm", "post_attention_layernorm", "mlp.gate"]
        if tc.get("shared_expert_intermediate_size", 0):
            mods += [
                "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj",
                "mlp.shared_expert.down_proj",
            ]
            mods += ["mlp.shared_expert_gate"]
        if (i + 1) % interval != 0:
            a = "linear_attn."
            mods += [
                a + m for m in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "conv1d")
            ]
            mods += [a + "norm"]
            names += [f"{p}{a}A_log", f"{p}{a}dt_bias"]
        else:
            mods += [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        names += [f"{p}{m}.weight" for m in mods]
    missing = [n for n in names if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: tensor '{missing[0]}' is missing{more}; incomplete or not this model type"
        )


def _expert_projection(
    tensors: dict[str, TensorInfo], tc: dict, quant: dict, module: str, path: Path
) -> ExpertProjection:
    found = {k: tensors[f"{module}.{k}"] for k in KINDS if f"{module}.{k}" in tensors}
    if "weight" not in found:
        raise CheckpointError(
            f"{path}: tensor '{module}.weight' is missing (routed experts; incomplete checkpoint?)"
        )
    w = found["weight"]
    H, I = tc["hidden_size"], tc["moe_intermediate_size"]
    out_dim, in_dim = (H, I) if module.endswith("down_proj") else (I, H)
    if len(w.shape) != 3 or w.shape[1] != out_dim:
        raise CheckpointError(
            f"{w.path}: '{w.name}' has shape {list(w.shape)}, expected [experts, {out_dim}, ...]"
        )
    E = w.shape[0]
    if "scales" not in found:
        if "biases" in found or w.dtype not in FLOAT_DTYPES or w.shape != (E, out_dim, in_dim):
            raise CheckpointError(
                f"{w.path}: '{w.name}' is {w.dtype}{list(w.shape)} without scales; an unquantized expert "
                f"weight must be a float [{E}, {out_dim}, {in_dim}]"
            )
        return ExpertProjection(module.rsplit(".", 1)[1], module, None, found)
    q = _quant_spec(quant, module, found, in_dim)
    expected = {"weight": (E, out_dim, in_dim * q.bits // 32), "scales": (E, out_dim, in_dim // q.group_size)}
    expected["biases"] = expected["scales"]
    for kind, t in found.items():
        dtypes = ("U32",) if kind == "weight" else (*FLOAT_DTYPES, "U8") if kind == "scales" else FLOAT_DTYPES
        if t.dtype not in dtypes or t.shape != expected[kind]:
            raise CheckpointError(
                f"{t.path}: '{t.name}' is {t.dtype}{list(t.shape)}, expected {'/'.join(dtypes)}"
                f"{list(expected[kind])} for {q.bits}-bit group {q.group_size}"
            )
    if q.mode == "affine" and "biases" not in found:
        raise CheckpointError(
            f"{path}: tensor '{module}.biases' is missing (affine quantization needs biases)"
        )
    return ExpertProjection(module.rsplit(".", 1)[1], module, q, found)


def _quant_spec(quant: dict, module: str, found: dict[str, TensorInfo], in_dim: int) -> Quant:
    """Bits and group size of a quantized module, resolved exactly as the model loader resolves them."""
    w, s = found["weight"], found["scales"]
    shapes = {f"{module}.{kind}": t.shape for kind, t in found.items()}
    try:
        q = QuantSpec(quant, shapes).quant_for(module, in_dims=in_dim)
    except CheckpointError as e:
        raise CheckpointError(
            f"{w.path}: cannot infer quantization of '{module}' from shapes {list(w.shape)} and "
            f"{list(s.shape)} (input dim {in_dim}): {e}"
        ) from None
    if q is None:
        raise CheckpointError(
            f"{w.path}: '{module}' has scales but config.json's quantization lists it as unquantized; "
            "the checkpoint and its config do not match"
        )
    return q


def _layer_expert_count(
    tensors: dict[str, TensorInfo], layer: dict[str, ExpertProjection], tc: dict, prefix: str, i: int
) -> int:
    counts = {t.shape[0] for proj in layer.values() for t in proj.tensors.values()}
    router = tensors[f"{prefix}layers.{i}.mlp.gate.weight"]
    if len(counts) != 1 or router.shape[0] not in counts:
        raise CheckpointError(
            f"{router.path}: layer {i} expert counts disagree: router has {router.shape[0]} outputs, "
            f"switch_mlp tensors have {sorted(counts)}"
        )
    (E,) = counts
    configured = tc["num_experts"]
    if E != configured:
        log.info("layer %d has %d experts (config num_experts %d): pruned checkpoint", i, E, configured)
    return E
