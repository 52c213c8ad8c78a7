"""Model configuration: config.json -> ``ModelArgs``, and the per-module quantization of a checkpoint.

Config flows one way: ``ModelArgs.from_dict`` reads the text-model keys (nested under ``text_config``
or flat), ignores the rest and derives everything else in ``__post_init__``. ``QuantSpec`` answers
"how is this module stored?" from the ``quantization`` dict and the stored tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from streamer.errors import ConfigError

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor name -> shard file


def read_config_file(
    directory: str | Path, fix: str = "re-download it", error: type[Exception] = ConfigError
) -> dict:
    """A model directory's config.json, parsed: the one place it is read.

    Raises:
        ``error`` (ConfigError unless the caller names a more specific one): the file is missing or is
        not JSON; the message names the file and ``fix``.
    """
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise error(f"{file} not found: is {directory} a model directory?")
    try:
        return json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e}); {fix}") from None


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


# ----------------------------------------------------------------------------------------------------
# Runtime knobs: every CLI flag lands here 1:1, converted in one place.
