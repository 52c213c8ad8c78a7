"""`streamer profile`: count how often each expert is routed to, for `--preload hot`."""

from __future__ import annotations

from pathlib import Path

import click

from streamer.cli.options import open_engine, progress_bar, resolve_model, with_runtime
from streamer.errors import ConfigError


@click.command()
@click.argument("model", required=False)
@click.option(
    "--text",
    "texts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A UTF-8 text file to run the model over (repeatable); text like what you will run works best.",
)
@click.option(
    "--trace",
    "traces",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A routing trace (`streamer generate/bench --trace`) to count instead of running the model "
    "(repeatable).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the profile (default: profile.json in the packed model, where --preload hot looks).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Profile at most this many tokens of all texts together.",
)
@click.option(
    "--reap",
    is_flag=True,
    help="Also measure each expert's REAP saliency (gate weight x expert output norm), for `streamer prune`.",
)
@with_runtime
def profile(model, texts, traces, out, max_tokens, reap, runtime, resident):
    """Count how often MODEL (the demo when omitted) routes to each expert, for `--preload hot`.

    Runs the model over each --text (teacher-forced, in contexts of 2048 tokens; after each file the
    profile so far is kept in PROFILE.progress, so the same command after an interruption goes on from
    the last whole file), or counts recorded --trace files without running it, and writes the counts
    next to the packed model (format: formats/PROFILE.md). --reap also measures REAP saliency, which
    `streamer prune --by reap` uses.

    \b
    Examples:
      streamer profile mlx-community/Qwen3.5-35B-A3B-4bit --text notes.md --text code.py
      streamer profile ./packed --trace route.jsonl
      streamer profile ./packed --text notes.md --reap && streamer prune ./packed ./pruned --ratio 0.25
      streamer chat ./packed --preload hot
    """
    from streamer.loader import read_config
    from streamer.models.args import ModelArgs
    from streamer.storage.packed import open_packed
    from streamer.storage.profile_file import default_profile_path, write_profile
    from streamer.storage.session import model_identity
    from streamer.tuning.profile import profile_texts, profile_traces

    if bool(texts) == bool(traces):
        raise ConfigError(
            "give --text FILE (run the model over text) or --trace FILE (count a trace), not both"
        )
    if resident:
        raise ConfigError("profile needs a packed model (a --resident run has no expert routing to count)")
    if traces and max_tokens is not None:
        raise ConfigError("--max-tokens applies to --text; a trace is counted whole")
    if traces and reap:
        raise ConfigError("--reap needs --text: a trace records routing, not the experts' outputs")
    if runtime.preload != "none":
        raise ConfigError("--preload does not apply to profile (it counts routing, not cache hits)")
    path = resolve_model(model)
    dst = out or default_profile_path(path)
    if texts:
        for t in texts:  # a missing file is an error before the model loads
            if not t.is_file():
                raise ConfigError(f"--text {t}: no such file")
        partial = dst.with_name(dst.name + ".progress")
        resume = _read_partial(partial, path)
        with open_engine(str(path), runtime, False) as engine, progress_bar("profiling") as bar:
            result = profile_texts(
                engine,
                texts,
                max_tokens=max_tokens,
                progress=bar,
                reap=reap,
                resume=resume,
                after_file=lambda p: write_profile(p, partial),
            )
        result.created = ""  # the partial file's time was stamped on it
    else:
        packed = open_packed(path)
        args = ModelArgs.from_dict(read_config(packed), source=str(path / "config.json"))
        top_k = args.num_experts_per_tok
        num_experts = [e.num_experts for e in packed.manifest.layers]
        result = profile_traces(traces, model_identity(path), num_experts, top_k)
    write_profile(result, dst)
    if texts:
        partial.unlink(missing_ok=True)
    hot = _hot_share(result)
    click.echo(
        f"profiled {result.tokens} tokens of {len(result.sources)} file(s) -> {dst} "
        f"(the top 25% of experts take {hot:.0%} of routing)",
        err=True,
    )


def _hot_share(profile) -> float:
    """Share of all routing that goes to each layer's most-routed quarter of experts."""
    top = total = 0
    for arrays in profile.arrays.values():
        counts = sorted(arrays["routed"], reverse=True)
        top += sum(counts[: max(1, len(counts) // 4)])
        total += sum(counts)
    return top / total if total else 0.0


def _read_partial(partial: Path, model_path: Path):
    """The profile an interrupted run left after its last whole file, or None."""
    from streamer.storage.profile_file import read_profile
    from streamer.storage.session import model_identity

    if not partial.is_file():
        return None
    found = read_profile(partial)
    if found.model["fingerprint"] != model_identity(model_path)["fingerprint"]:
        raise ConfigError(f"{partial} holds an interrupted profile of another model; delete it to start over")
    click.echo(f"resuming after {len(found.sources)} file(s) already profiled ({partial})", err=True)
    return found
