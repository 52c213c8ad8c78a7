"""`streamer synthetic`: write a random-weight checkpoint in the mlx-community layout."""

from __future__ import annotations

import time
from pathlib import Path

import click

from streamer.errors import ConfigError
from streamer.synthetic.presets import FULL_WIDTH, PRESETS, get_preset
from streamer.synthetic.writer import checkpoint_bytes, generate

_PRESET_HELP = "\n".join(f"  {name:10} {p.description}" for name, p in PRESETS.items())


@click.command(
    epilog="\b\nPresets:\n"
    + _PRESET_HELP
    + f"\n  {FULL_WIDTH:10} real 397B widths; pick --layers (≈3.6 GB of experts each)"
)
@click.argument("preset", type=click.Choice([*PRESETS, FULL_WIDTH]), metavar="PRESET")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="Float dtype of unquantized tensors and scales (float32 for exact CPU comparisons).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Every weight derives from the seed.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Override the preset's layer count.")
@click.option(
    "--shard-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Maximum safetensors shard size.",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=576),
    default=None,
    help="full-width only: a smaller vocabulary (e.g. 576) so CPU benchmarks measure the layers.",
)
def synthetic(
    preset: str, dst: Path, dtype: str, seed: int, layers: int | None, shard_gb: float, vocab_size: int | None
) -> None:
    """Write a synthetic Qwen3.5-MoE checkpoint (random weights) to DST.

    The output is byte-compatible with what mlx_lm.convert publishes on mlx-community, so every
    command that takes a model accepts it. It streams to disk: a full-width checkpoint of tens of GB
    never needs more than one expert in memory.
    """
    if dst.exists():
        raise ConfigError(f"{dst} already exists; choose a new directory or delete it first")
    if vocab_size is not None and preset != FULL_WIDTH:
        raise ConfigError("--vocab-size applies to the full-width preset only")
    spec = get_preset(preset, layers, vocab_size)
    total = checkpoint_bytes(spec, dtype)
    click.echo(
        f"writing {preset} ({total / 1e9:.2f} GB, {spec.text_config['num_hidden_layers']} layers) to {dst}",
        err=True,
    )
    start = time.monotonic()
    with click.progressbar(length=total, label="tensors", file=click.get_text_stream("stderr")) as bar:
        last = [0]

        def progress(done: int, _total: int) -> None:
            bar.update(done - last[0])
            last[0] = done

        generate(
            dst, spec, dtype=dtype, seed=seed, max_shard_bytes=int(shard_gb * (1 << 30)), progress=progress
        )
    secs = time.monotonic() - start
    click.echo(f"done in {secs:.1f} s ({total / 1e9 / max(secs, 1e-9):.2f} GB/s)", err=True)
