"""Model configuration: config.json -> ``ModelArgs``, and the per-module quantization of a checkpoint.

Config flows one way: ``ModelArgs.from_dict`` reads the text-model keys (nested under ``text_config``
or flat), ignores the rest and derives everything else in ``__post_init__``. ``QuantSpec`` answers
"how is this module stored?" from the ``quantization`` dict and the stored tensor shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import CheckpointError, ConfigError

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class ModelArgs:
    """The Qwen3.5 hybrid MoE text model's hyper-parameters (names as in config.json)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    linear_num_value_heads: int
    linear_num_key_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 262144
    rope_parameters: dict = field(default_factory=dict)
    layer_types: list[str] | None = None
    # Older flat configs carry these at the top level instead of in rope_parameters.
    rope_theta: float = 100000.0
    partial_rotary_factor: float = 0.25

    # Derived in __post_init__.
    rotary_dim: int = field(init=False)
    is_linear: tuple[bool, ...] = field(init=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; streamer runs Qwen3.5 MoE "
                f"checkpoints (model_type one of {', '.join(MODEL_TYPES)})"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope = self.rope_parameters
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
        self.rope_theta = float(rope.get("rope_theta", self.rope_theta))
        self.partial_rotary_factor = float(rope.get("partial_rotary_factor", self.partial_rotary_factor))
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        n, interval = self.num_hidden_layers, self.full_attention_interval
        self.is_linear = tuple((i + 1) % interval != 0 for i in range(n))
        self._check()

    def _check(self) -> None:
        if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}: "
                "a sparse MoE model needs 0 < num_experts_per_tok <= num_experts"
            )
        for heads, groups in [
            ("num_attention_heads", "num_key_value_heads"),
            ("linear_num_value_heads", "linear_num_key_heads"),
        ]:
            if getattr(self, heads) % getattr(self, groups) != 0:
                raise ConfigError(
                    f"{heads}={getattr(self, heads)} is not a multiple of {groups}={getattr(self, groups)}"
                )
        if self.layer_types is not None:
            expected = ["linear_attention" if lin else "full_attention" for lin in self.is_linear]
            if list(self.layer_types) != expected:
                raise ConfigError(
                    "config layer_types disagree with full_attention_interval="
                    f"{self.full_attention_interval}: got {self.layer_types}, expected {expected}"
                )

    @classmethod
    def from_dict(cls, config: Mapping, source: str = "config.json") -> ModelArgs:
        """Builds the args from a config.json dict (``text_config`` nested or flat).

        Args:
            config: the parsed config.json.
            source: how errors name the config (e.g. its path).

        Raises:
            ConfigError: unknown model_type, missing or mistyped required fields, inconsistent values.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(config).__name__}")
        top_type = config.get("model_type")
        if top_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {top_type!r} is not supported; streamer runs Qwen3.5 MoE checkpoints "
                f"(model_type one of {', '.join(MODEL_TYPES)})"
            )
        params = config.get("text_config", config)
        if not isinstance(params, Mapping):
            raise ConfigError(f"{source}: text_config must be an object, got {type(params).__name__}")
        params = dict(params)
        params.setdefault("model_type", top_type)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in params]
        if missing:
            raise ConfigError(
                f"{source} is missing required text-model fields: {', '.join(missing)} (a Qwen3.5 MoE "
                "config.json has them under text_config or at the top level); re-download config.json"
            )
        bad = [n for n in required if n != "model_type" and not _positive_int(params[n])]
        if bad:
            got = ", ".join(f"{n}={params[n]!r}" for n in bad)
            raise ConfigError(f"{source}: {got}: must be positive integers; re-download config.json")
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the DeltaNet short convolution: q, k and v side by side."""
        return 2 * self.linear_key_dim + self.linear_value_dim


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class Quant(NamedTuple):
    """How one module's weight is quantized."""

    bits: int
    group_size: int
    mode: str = "affine"


class QuantSpec:
    """Per-module quantization of a checkpoint, resolved as mlx-lm's loader resolves it.

    A module named in ``config["quantization"]`` uses that entry (``False`` = not quantized); any other
    module with stored ``.scales`` is quantized with parameters inferred from its tensor shapes; a
    module without ``.scales`` is not quantized.

    Args:
        quantization: config.json's ``quantization`` dict (defaults + overrides by module path), or None.
        shapes: stored tensor name -> shape, for every tensor of the checkpoint.
    """

    def __init__(self, quantization: Mapping | None, shapes: Mapping[str, tuple[int, ...]]):
        quantization = dict(quantization or {})
        self.default_group_size = int(quantization.pop("group_size", 64))
        self.default_bits = quantization.pop("bits", None)
        self.mode = quantization.pop("mode", "affine")
        self.overrides = {k: v for k, v in quantization.items() if isinstance(v, (dict, bool))}
        self.shapes = shapes

    @classmethod
    def from_config(cls, config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> QuantSpec:
        quantization = config.get("quantization", config.get("quantization_config"))
        return cls(quantization, shapes)

    def quant_for(self, module_path: str, in_dims: int | None = None) -> Quant | None:
        """The quantization of ``module_path`` (e.g. "language_model.model.layers.0.mlp.gate"), or None.

        Args:
            module_path: the module's tensor-name prefix, without ``.weight``.
            in_dims: the module's unquantized input size, when the caller knows it. Shapes alone fix
                only bits * group_size; with ``in_dims`` the answer is exact, without it the
                default group size is preferred.

        Raises:
            CheckpointError: the stored shapes fit no supported bits / group size, or contradict the
                config entry.
        """
        entry = self.overrides.get(module_path)
        has_scales = f"{module_path}.scales" in self.shapes
        if entry is False or (entry is None and not has_scales):
            return None
        if not has_scales:
            raise CheckpointError(
                f"{module_path}: config.json quantization lists it as {entry} but the checkpoint has "
                f"no {module_path}.scales; the checkpoint and its config do not match"
            )
        if f"{module_path}.weight" not in self.shapes:
            raise CheckpointError(f"{module_path}: the checkpoint has .scales but no {module_path}.weight")
        packed = self.shapes[f"{module_path}.weight"][-1]  # in_dims * bits / 32 uint32 words
        groups = self.shapes[f"{module_path}.scales"][-1]  # in_dims / group_size
        if isinstance(entry, dict):
            quant = Quant(int(entry["bits"]), int(entry["group_size"]), entry.get("mode", self.mode))
        elif entry is True and self.default_bits is not None:
            quant = Quant(int(self.default_bits), self.default_group_size, self.mode)
        elif in_dims is not None:
            quant = Quant(packed * 32 // in_dims, in_dims // groups, self.mode)
        else:
            quant = self._infer(module_path, packed, groups)
        if (
            quant.bits not in SUPPORTED_BITS
            or packed * 32 != quant.bits * quant.group_size * groups
            or (in_dims is not None and in_dims != quant.group_size * groups)
        ):
            raise CheckpointError(
                f"{module_path}: stored weight [..., {packed}] and scales [..., {groups}] do not fit "
                f"{quant.bits}-bit quantization with group size {quant.group_size}"
                + (f" of {in_dims} inputs" if in_dims is not None else "")
            )
        return quant

    def _infer(self, module_path: str, packed: int, groups: int) -> Quant:
        # packed * 32 = bits * in_dims and in_dims = group_size * groups, so only
        # bits * group_size = packed * 32 / groups is known: try the default group size first.
        for group_size in dict.fromkeys([self.default_group_size, 64, 32, 128]):
            bits, rest = divmod(packed * 32, group_size * groups)
            if rest == 0 and bits in SUPPORTED_BITS:
                return Quant(bits, group_size, self.mode)
        raise CheckpointError(
            f"{module_path}: cannot infer quantization from weight [..., {packed}] and scales "
            f"[..., {groups}]; add an entry for it to config.json's quantization dict"
        )


# ----------------------------------------------------------------------------------------------------
# Runtime knobs: every CLI flag lands here 1:1, converted in one place.

IO_MODES = ("buffered", "direct")
PREFETCH_MODES = ("off", "parallel", "predict")
# Memory left to the OS, the page cache's working set and activations when the budget is derived.
HEADROOM_BYTES = 4 << 30
# The fraction of RAM streamer allows itself when no budget is given.
RAM_SHARE = 0.75


@dataclass
class RuntimeConfig:
    """How to run a model: expert cache size, I/O, prefetch, threads, compute dtype.

    ``cache_bytes`` (``--cache-gb``) and ``cache_experts`` (``--cache-experts``) are alternatives;
    with neither, ``default_cache_bytes`` derives the budget from the machine's RAM.
    """

    cache_bytes: int | None = None
    cache_experts: int | None = None
    io_mode: str = "buffered"
    prefetch: str = "parallel"
    threads: int = 8
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    io_timeout_s: float = 60.0  # --io-timeout: the longest wait for one expert read

    def __post_init__(self):
        if self.cache_bytes is not None and self.cache_experts is not None:
            raise ConfigError("give --cache-gb or --cache-experts, not both")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ConfigError(f"--cache-gb must be positive, got {self.cache_bytes / 1e9:g}")
        if self.cache_experts is not None and self.cache_experts <= 0:
            raise ConfigError(f"--cache-experts must be positive, got {self.cache_experts}")
        if self.io_mode not in IO_MODES:
            raise ConfigError(f"--io must be one of {', '.join(IO_MODES)}, got {self.io_mode!r}")
        if self.prefetch not in PREFETCH_MODES:
            raise ConfigError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {self.prefetch!r}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if not (self.io_timeout_s > 0 and math.isfinite(self.io_timeout_s)):
            raise ConfigError(f"--io-timeout must be a positive number of seconds, got {self.io_timeout_s}")


def total_ram_bytes() -> int:
    """Memory this process may use: physical RAM, or its own memory cgroup's limit if lower (Linux)."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in _cgroup_limit_files():
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def _cgroup_limit_files(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[str]:
    """The memory limit files of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``): a limit set on any of them applies."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = f"{root}/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        files += [
            f"{base}/{'/'.join(parts[:i])}/{name}".replace("//", "/") for i in range(len(parts), -1, -1)
        ]
    return files


def default_cache_bytes(resident_bytes: int, expert_bytes: int, ram_bytes: int | None = None) -> int:
    """The expert cache budget when the user gives none.

    ``RAM × 0.75 − resident weights − 4 GB headroom`` (KV cache, DeltaNet state, activations, the OS),
    never more than all experts. The caller raises it to the minimum (one layer's top-k) if needed.
    """
    ram = total_ram_bytes() if ram_bytes is None else ram_bytes
    return max(0, min(expert_bytes, int(ram * RAM_SHARE) - resident_bytes - HEADROOM_BYTES))
