"""One pipeline stage: a contiguous run of decoder layers with their resident weights and expert runtime.

Rank 0's stage also holds the embedding, the final norm and the output head (``front``). The stage builds
the same ``Model`` as one process would and swaps every layer it does not hold for an empty module, so
tensor names, quantization and the layer maths are exactly the single-process model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from streamer.errors import PackedFormatError
from streamer.experts.budget import default_cache_bytes
from streamer.experts.runtime import ExpertRuntime, block_shape_of
from streamer.experts.streamed import StreamedExperts
from streamer.loader import (
    _wire_memory,
    check_matches_config,
    check_routing,
    make_runtime,
    preload,
    read_config,
    routing_label,
)
from streamer.models.args import ModelArgs
from streamer.models.layer_cache import DeltaNetCache, KVCache
from streamer.models.load import _resolve_dtype, assign_weights, quantize_modules
from streamer.models.quantization import QuantSpec
from streamer.models.qwen3_5_moe import DecoderLayer, Model
from streamer.settings import RuntimeConfig
from streamer.storage.packed import PackedModel, _check_size
from streamer.storage.packed_format import (
    RESIDENT_FILE,
    Manifest,
    check_layer_header,
    describe_layers,
    resident_layer_of,
)
from streamer.storage.verify import read_any_manifest

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """Layers ``layers`` (absolute indices) of ``model``; the others are empty modules."""

    model: Model
    args: ModelArgs
    layers: range
    runtime: ExpertRuntime
    front: bool  # holds the embedding and the output head (rank 0)
    routing: dict

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [self.model.layers[i] for i in self.layers]

    def make_cache(self) -> list:
        """This stage's per-layer state (the single-process ``make_cache`` restricted to its layers)."""
        return [DeltaNetCache() if self.args.is_linear[i] else KVCache() for i in self.layers]

    def run(self, h: mx.array, cache: list) -> mx.array:
        """Hidden states [B, L, H] through this stage's layers."""
        for layer, c in zip(self.decoder_layers, cache, strict=True):
            h = layer(h, c)
        return h

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.language_model.model.embed_tokens(tokens).astype(self.model.dtype)  # [B, L, H]

    def head(self, h: mx.array) -> mx.array:
        """Final norm and output head, as ``Model.__call__`` ends."""
        text = self.model.language_model.model
        h = text.norm(h)
        if self.args.tie_word_embeddings:
            return text.embed_tokens.as_linear(h)
        return self.model.language_model.lm_head(h)

    def close(self) -> None:
        self.runtime.close()


def open_stage_packed(path: Path, layers: range, front: bool = False, rank: int | None = None) -> PackedModel:
    """The packed model with only what the stage of ``layers`` reads checked: a machine may hold only its
    own stage's files (some layer files of a whole copy, or a ``streamer repack --layers`` copy).

    Args:
        front: the stage also runs the embedding and the output head (rank 0).
        rank: named in errors.

    Raises:
        PackedFormatError: one line naming the rank, the layers it lacks and the command that fixes it.
    """
    manifest = read_any_manifest(path)
    who = "this rank" if rank is None else f"rank {rank}"
    fix = _stage_fix(path, manifest, layers)
    stage = manifest.stage
    if stage is not None:
        missing = [i for i in layers if i not in stage.layers]
        if missing or (front and not stage.front):
            lacks = describe_layers(missing) if missing else "the embedding and output head"
            raise PackedFormatError(
                f"{who}: {path} holds only {describe_layers(stage.layers)} (a pipeline stage's copy), "
                f"its stage needs {_needs(layers, front)}: it lacks {lacks}; {fix}"
            )
    try:
        _check_size(path / RESIDENT_FILE, manifest.resident_bytes)
    except PackedFormatError as e:
        raise PackedFormatError(f"{who}: {e}; {fix}") from None
    bad: list[tuple[int, PackedFormatError]] = []
    for i in layers:
        entry = manifest.layers[i]
        file = path / entry.file
        try:
            _check_size(file, entry.file_bytes)
            with open(file, "rb") as f:
                check_layer_header(f.read(entry.data_offset), entry, file)
        except PackedFormatError as e:
            bad.append((i, e))
    if bad:
        raise PackedFormatError(
            f"{who}: {path} lacks files its stage ({_needs(layers, front)}) needs: "
            f"{describe_layers(i for i, _ in bad)} ({bad[0][1]}); {fix}"
        )
    return PackedModel(path, manifest)


def _needs(layers: range, front: bool) -> str:
    held = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
    return held + (" with the embedding and output head" if front else "")


def _stage_fix(path: Path, manifest: Manifest, layers: range) -> str:
    """The command that writes a stage's files on this machine (keeping the intact ones already here)."""
    if not layers:
        return 'run "streamer repack SRC DIR --layers FIRST:LAST" for this rank\'s layers'
    fix = (
        f'run "streamer repack SRC {path} --layers {layers[0]}:{layers[-1]}" on this machine (SRC: the '
        f"{manifest.source.get('name')!r} checkpoint; it keeps the intact files already here)"
    )
    if manifest.stage is None:
        fix += ", or copy those experts/layer_NNN.bin files from a whole copy"
    return fix


def stage_cache_bytes(packed: PackedModel, args: ModelArgs, layers: range, config: RuntimeConfig,
                      resident_bytes: int) -> int:  # fmt: skip
    """This rank's expert cache: --cache-gb / --cache-experts apply per rank; by default from its own RAM."""
    if config.cache_bytes is not None:
        return config.cache_bytes
    dtype = _resolve_dtype(config.dtype)
    entries = [packed.manifest.layers[i] for i in layers]
    slot_bytes = [block_shape_of(e, dtype).nbytes for e in entries]
    if config.cache_experts is not None:
        mean = sum(b * e.num_experts for b, e in zip(slot_bytes, entries, strict=True)) / sum(
            e.num_experts for e in entries
        )
        return int(config.cache_experts * mean)
    minimum = args.num_experts_per_tok * sum(set(slot_bytes))
    all_slots = sum(b * e.num_experts for b, e in zip(slot_bytes, entries, strict=True))
    return max(minimum, default_cache_bytes(resident_bytes, all_slots))


def load_stage(
    path: Path, config: RuntimeConfig, layers: range, front: bool, rank: int | None = None
) -> Stage:
    """Loads ``layers`` of the packed model at ``path``: their resident weights, expert files and cache.

    ``path`` may be a whole packed copy, one missing other stages' expert files, or a pipeline stage's
    copy (``streamer repack --layers``) that holds ``layers``. ``rank`` is named in errors.

    Raises:
        PackedFormatError, CheckpointError, ConfigError: as ``loader.load_streamed``.
    """
    packed = open_stage_packed(path, layers, front, rank)
    raw_config = read_config(packed)
    args = ModelArgs.from_dict(raw_config, source=str(path / "config.json"))
    check_matches_config(packed, args)
    check_routing(config, args, streamed=True)
    model = Model(args, dtype=_resolve_dtype(config.dtype))
    text = model.language_model.model
    for i in range(args.num_hidden_layers):
        if i not in layers:
            text.layers[i] = nn.Module()  # not this rank's: no parameters, never called
    if not front:
        text.embed_tokens, text.norm = nn.Module(), nn.Module()
        if not args.tie_word_embeddings:
            model.language_model.lm_head = nn.Module()
    all_weights = packed.load_resident()
    keep = {n: w for n, w in all_weights.items() if _held(n, layers, front)}
    resident_bytes = sum(w.nbytes for w in keep.values())
    cache_bytes = stage_cache_bytes(packed, args, layers, config, resident_bytes)
    runtime = make_runtime(packed, args, config, model.dtype, cache_bytes, layers=layers)
    try:
        top_k = config.experts_per_token or args.num_experts_per_tok
        for i in layers:
            nxt = text.layers[i + 1] if i + 1 in layers else None  # the next layer's router, if held here
            predictor = (lambda x, mlp=nxt.mlp: mlp.gate(x)) if nxt is not None else None
            text.layers[i].mlp.replace_experts(StreamedExperts(runtime, i, predictor, top_k))
            if not config.exact_routing:
                mask = (lambda i=i: runtime.cached_mask(i)) if config.cache_bias else None
                text.layers[i].mlp.set_routing(config.experts_per_token, config.cache_bias, mask)
        spec = QuantSpec.from_config(raw_config, {n: tuple(w.shape) for n, w in all_weights.items()})
        quantize_modules(model, spec)
        assign_weights(model, keep, model.dtype, source=path)
        mx.eval(model.parameters())
        _wire_memory(resident_bytes + runtime.cache.capacity_bytes)
        preload(runtime, path, config)  # --preload, over this stage's own layers
        log.info(
            "stage layers %d-%d: expert cache %.2f GB",
            layers[0],
            layers[-1],
            runtime.cache.capacity_bytes / 1e9,
        )
    except BaseException:
        runtime.close()
        raise
    return Stage(model, args, layers, runtime, front, routing_label(config, args))


def _held(name: str, layers: range, front: bool) -> bool:
    i = resident_layer_of(name)
    return front if i is None else i in layers
