"""Which layers each pipeline rank holds: contiguous stages, balanced by bytes or given by the user."""

from __future__ import annotations

from streamer.errors import ConfigError
from streamer.storage.packed import PackedModel
from streamer.storage.packed_format import resident_layer_of


def stage_costs(packed: PackedModel) -> tuple[list[int], int]:
    """Bytes per layer (its resident tensors + its expert file) and the bytes of the rest (rank 0's).

    The whole model's, also from a stage's copy (whose manifest records them), so that every rank
    computes the same split whatever its directory holds.
    """
    layers = [entry.file_bytes for entry in packed.manifest.layers]
    stage = packed.manifest.stage
    if stage is not None:
        return [
            a + b for a, b in zip(layers, stage.resident_layer_bytes, strict=True)
        ], stage.resident_other_bytes
    rest = 0
    for name, info in packed.resident_tensors().items():
        i = resident_layer_of(name)
        if i is None:
            rest += info.nbytes
        else:
            layers[i] += info.nbytes
    return layers, rest


def split_by_bytes(costs: list[int], ranks: int, first_extra: int = 0) -> list[range]:
    """Contiguous stages, at least one layer each, minimising the largest stage's bytes.

    ``first_extra`` counts against rank 0 (it also holds the embedding and the output head).

    Raises:
        ConfigError: more ranks than layers.
    """
    n = len(costs)
    if ranks > n:
        raise ConfigError(f"{ranks} ranks but the model has {n} layers; start at most {n} ranks")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[r][i]: the least possible largest stage when ranks 0..r-1 hold layers 0..i-1;
    # cut[r][i]: where rank r-1's stage then starts.
    best = [[inf] * (n + 1) for _ in range(ranks + 1)]
    cut = [[0] * (n + 1) for _ in range(ranks + 1)]
    best[0][0] = 0
    for r in range(1, ranks + 1):
        extra = first_extra if r == 1 else 0
        for i in range(r, n - (ranks - r) + 1):
            for j in range(r - 1, i):
                worst = max(best[r - 1][j], prefix[i] - prefix[j] + extra)
                if worst < best[r][i]:
                    best[r][i], cut[r][i] = worst, j
    bounds, i = [], n
    for r in range(ranks, 0, -1):
        bounds.append(range(cut[r][i], i))
        i = cut[r][i]
    return bounds[::-1]


def parse_split(text: str, num_layers: int, ranks: int) -> list[range]:
    """``--pipeline-split`` "A,B,..": layers per rank, in rank order, adding up to the model's layers.

    Raises:
        ConfigError: naming what is wrong and the fix.
    """
    try:
        counts = [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        raise ConfigError(
            f"--pipeline-split must be comma-separated layer counts, one per rank (e.g. 3,5), got {text!r}"
        ) from None
    if len(counts) != ranks:
        raise ConfigError(
            f"--pipeline-split {text} gives {len(counts)} stages for {ranks} ranks; give one count per rank"
        )
    if min(counts) < 1 or sum(counts) != num_layers:
        raise ConfigError(
            f"--pipeline-split {text}: each rank needs at least one layer and the counts must add up to the "
            f"model's {num_layers} layers"
        )
    stages, start = [], 0
    for c in counts:
        stages.append(range(start, start + c))
        start += c
    return stages
