"""Load a model ready to generate: a packed model with streamed experts, or a checkpoint held resident.

``Engine`` bundles what every front end (generate, chat, serve, bench) needs: the model, its tokenizer,
the expert runtime (None when resident) and a ``stats()`` snapshot for telemetry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from streamer.errors import CheckpointError, ConfigError, PackedFormatError
from streamer.experts.budget import cache_budget
from streamer.experts.runtime import ExpertRuntime
from streamer.experts.streamed import StreamedExperts
from streamer.models.args import CONFIG_FILE, ModelArgs, read_config_file
from streamer.models.load import _resolve_dtype, assign_weights, load_model, quantize_modules
from streamer.models.quantization import QuantSpec
from streamer.models.qwen3_5_moe import Model
from streamer.settings import RuntimeConfig
from streamer.storage.packed import PackedModel, open_packed, repair_hint
from streamer.storage.packed_format import MANIFEST_FILE
from streamer.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Engine:
    model: Model
    args: ModelArgs
    tokenizer: Tokenizer
    path: Path
    runtime: ExpertRuntime | None = None
    # How experts are chosen (``routing_label``): every stats snapshot carries it, so each front end
    # that shows stats (generate --json, bench, /v1/stats) labels approximate output.
    routing: dict = field(default_factory=lambda: {"mode": "exact"})

    def stats(self) -> dict:
        stats = self.runtime.snapshot_stats() if self.runtime else {}
        return {**stats, "routing": dict(self.routing)}

    def close(self) -> None:
        if self.runtime:
            self.runtime.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_packed(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def load_engine(
    path: str | Path,
    config: RuntimeConfig | None = None,
    *,
    resident: bool = False,
    preload_progress: Callable[[int, int], None] | None = None,
) -> Engine:
    """Loads a packed model (streamed experts) or, with ``resident``, a source checkpoint fully in memory.

    ``config.preload`` fills the expert cache before returning (``preload_progress(done, total)``).

    Raises:
        CheckpointError: a source checkpoint given without ``resident`` (it must be repacked first).
    """
    path = Path(path)
    config = config or RuntimeConfig()
    if is_packed(path):
        return load_streamed(path, config, preload_progress)
    if not resident:
        raise CheckpointError(
            f"{path} is a checkpoint, not a packed model: run `streamer repack {path}` first "
            "(or pass --resident to hold every expert in memory)"
        )
    model, args = load_model(path, config.dtype)
    apply_routing(model, args, config, None)
    return Engine(model, args, Tokenizer(path), path, routing=routing_label(config, args))


def make_runtime(
    packed: PackedModel,
    args: ModelArgs,
    config: RuntimeConfig,
    dtype: mx.Dtype,
    cache_bytes: int,
    layers: list[int] | None = None,
) -> ExpertRuntime:
    """The expert runtime the runtime flags describe, with ``cache_bytes`` of slots (``layers``: only
    those layers' files and pools, for a pipeline stage; None: all)."""
    return ExpertRuntime(
        packed,
        cache_bytes=cache_bytes,
        min_slots=args.num_experts_per_tok,
        io_mode=config.io_mode,
        threads=config.threads,
        io_timeout_s=config.io_timeout_s,
        prefetch=config.prefetch,
        dtype=dtype,
        verify_reads=config.verify_reads,
        policy=config.cache_policy,
        layers=layers,
    )


def load_streamed(
    path: Path, config: RuntimeConfig, preload_progress: Callable[[int, int], None] | None = None
) -> Engine:
    """Builds the model from a packed directory: resident weights loaded, experts behind the cache."""
    packed = open_packed(path)
    raw_config = read_config(packed)
    args = ModelArgs.from_dict(raw_config, source=str(path / "config.json"))
    check_matches_config(packed, args)
    model = Model(args, dtype=_resolve_dtype(config.dtype))
    check_routing(config, args, streamed=True)
    cache_bytes = cache_budget(packed, args, config.cache_bytes, config.cache_experts, config.dtype)
    runtime = make_runtime(packed, args, config, model.dtype, cache_bytes)
    try:
        layers = model.layers
        for i, layer in enumerate(layers):
            # The next layer's router, looked up at call time (quantization replaces the module).
            predictor = (lambda x, mlp=layers[i + 1].mlp: mlp.gate(x)) if i + 1 < len(layers) else None
            top_k = config.experts_per_token or args.num_experts_per_tok
            layer.mlp.replace_experts(StreamedExperts(runtime, i, predictor, top_k))
        apply_routing(model, args, config, runtime)
        weights = packed.load_resident()
        spec = QuantSpec.from_config(raw_config, {n: tuple(w.shape) for n, w in weights.items()})
        quantize_modules(model, spec)
        assign_weights(model, weights, model.dtype, source=path)
        mx.eval(model.parameters())
        _wire_memory(packed.manifest.resident_bytes + runtime.cache.capacity_bytes)
        log.info(
            "expert cache: %.2f GB of %.2f GB experts",
            runtime.cache.capacity_bytes / 1e9,
            packed.manifest.expert_bytes / 1e9,
        )
        preload(runtime, path, config, preload_progress)
    except BaseException:
        runtime.close()
        raise
    return Engine(model, args, Tokenizer(path), path, runtime, routing=routing_label(config, args))


def check_routing(config: RuntimeConfig, args: ModelArgs, streamed: bool) -> None:
    """The approximate-routing flags must fit the model and the way its experts are held.

    Raises:
        ConfigError: --experts-per-token above the model's top-k, or --cache-bias without a cache.
    """
    top_k, k = args.num_experts_per_tok, config.experts_per_token
    if k is not None and k > top_k:
        raise ConfigError(
            f"--experts-per-token {k} is more than the model's {top_k} experts per token "
            f"(num_experts_per_tok in config.json); give 1 .. {top_k}, or leave it out for exact routing"
        )
    if config.cache_bias and not streamed:
        raise ConfigError(
            "--cache-bias favours experts in the expert cache, and a --resident model has none (every "
            "expert is in memory); run the packed model, or drop --cache-bias"
        )


def apply_routing(
    model: Model, args: ModelArgs, config: RuntimeConfig, runtime: ExpertRuntime | None
) -> None:
    """Sets every MoE block's routing from ``config``; exact routing leaves the blocks untouched.

    Raises:
        ConfigError: see ``check_routing``.
    """
    check_routing(config, args, streamed=runtime is not None)
    if config.exact_routing:
        return
    for i, layer in enumerate(model.layers):
        mask = (lambda layer_index=i: runtime.cached_mask(layer_index)) if config.cache_bias else None
        layer.mlp.set_routing(config.experts_per_token, config.cache_bias, mask)


def routing_label(config: RuntimeConfig, args: ModelArgs) -> dict:
    """What the output's routing is: ``{"mode": "exact"}``, or "approximate" with the settings used."""
    top_k = args.num_experts_per_tok
    k = config.experts_per_token or top_k
    if k == top_k and not config.cache_bias:  # --experts-per-token = top-k is the exact routing
        return {"mode": "exact"}
    return {"mode": "approximate", "experts_per_token": k, "model_experts_per_token": top_k,
            "cache_bias": config.cache_bias}  # fmt: skip


def describe_routing(label: dict, short: bool = False) -> str:
    """One line for people: "exact routing", or what the approximation is (and, unless ``short``, how to
    measure it)."""
    if label.get("mode", "exact") == "exact":
        return "exact routing"
    parts = []
    if label["experts_per_token"] != label["model_experts_per_token"]:
        parts.append(f"{label['experts_per_token']} of {label['model_experts_per_token']} experts per token")
    if label["cache_bias"]:
        parts.append(f"cache bias {label['cache_bias']:g}")
    if short:
        return f"APPROXIMATE routing ({', '.join(parts)})"
    return (
        f"APPROXIMATE routing ({', '.join(parts)}): output differs from the model's exact output; "
        "`streamer bench --compare-exact` measures by how much"
    )


def preload(
    runtime: ExpertRuntime,
    path: Path,
    config: RuntimeConfig,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Fills the expert cache as ``config.preload`` says; returns experts read.

    Raises:
        ProfileError: ``hot`` without a profile of this model (the message says how to make one).
    """
    if config.preload == "none":
        return 0
    start = time.perf_counter()
    if config.preload == "all":
        loaded = runtime.preload()
    else:
        from streamer.experts.hot_set import hot_keys, load_profile_for

        profile = load_profile_for(runtime, path, config.profile)
        loaded = runtime.preload_keys(hot_keys(profile, runtime), progress=progress)
    log.info("preloaded %d experts (%s) in %.1f s", loaded, config.preload, time.perf_counter() - start)
    return loaded


def check_matches_config(packed: PackedModel, args: ModelArgs) -> None:
    """The manifest's expert layers must be the ones config.json describes (same model, same shapes).

    Raises:
        PackedFormatError: naming the manifest, the layer and what differs.
    """
    where = packed.path / MANIFEST_FILE
    fix = "the directory mixes files of different models; repack the checkpoint into a new directory"
    layers = packed.manifest.layers
    if len(layers) != args.num_hidden_layers:
        raise PackedFormatError(
            f"{where}: {len(layers)} expert layers, config.json says num_hidden_layers="
            f"{args.num_hidden_layers}; {fix}"
        )
    H, I = args.hidden_size, args.moe_intermediate_size
    for entry in layers:
        for name, rows in (("gate_proj", I), ("up_proj", I), ("down_proj", H)):
            try:
                shape = entry.component(f"{name}.weight").shape
            except KeyError:
                raise PackedFormatError(f"{where}: layer {entry.layer} has no {name}.weight; {fix}") from None
            if not shape or shape[0] != rows:
                raise PackedFormatError(
                    f"{where}: layer {entry.layer} {name}.weight is {list(shape)} per expert, config.json "
                    f"implies [{rows}, ...] (hidden_size {H}, moe_intermediate_size {I}); {fix}"
                )
        if entry.num_experts < args.num_experts_per_tok:
            raise PackedFormatError(
                f"{where}: layer {entry.layer} has {entry.num_experts} experts, fewer than "
                f"num_experts_per_tok={args.num_experts_per_tok} in config.json; {fix}"
            )


def read_config(packed: PackedModel) -> dict:
    """config.json of a packed model, parsed (``open_packed`` checked its size, not its bytes)."""
    hint = repair_hint(packed.path, packed.manifest, packed.path / CONFIG_FILE)
    return read_config_file(packed.path, fix=hint, error=PackedFormatError)


def _wire_memory(nbytes: int) -> None:
    """On Apple GPUs, keep resident weights and the expert cache wired (not paged out under pressure).

    Capped below the device's recommended working set so the OS page cache keeps room (flash-moe saw
    wired memory squeeze the page cache into compressor thrash). A no-op on other backends.
    """
    if not (hasattr(mx, "metal") and mx.metal.is_available()):
        return
    limit = int(mx.metal.device_info().get("max_recommended_working_set_size", 0) * 0.9)  # pragma: no cover
    mx.set_wired_limit(min(nbytes, limit) if limit else nbytes)  # pragma: no cover
