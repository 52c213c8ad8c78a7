"""`streamer prune`: write a packed model without the experts a profile says matter least."""

from __future__ import annotations

from pathlib import Path

import click

from streamer.cli.options import progress_bar, resolve_model, with_runtime
from streamer.errors import ConfigError


@click.command()
@click.argument("model")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--ratio", type=float, default=None, help="Share of each layer's experts to remove (0 < R < 1)."
)
@click.option("--keep", type=int, default=None, help="Experts to keep per layer (top-k .. experts - 1).")
@click.option(
    "--by",
    type=click.Choice(["reap", "frequency", "random"]),
    default="reap",
    show_default=True,
    help="Which experts go: lowest REAP saliency, least routed, or a seeded random choice (a baseline).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --by random.")
@click.option(
    "--export-checkpoint",
    "export_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write the pruned model as an mlx-community checkpoint here (mlx-lm loads it).",
)
@click.option(
    "--heldout",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Text to measure the divergence on; not a text the profile saw (default: streamer's own sources).",
)
@click.option(
    "--heldout-tokens",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Tokens of held-out text the divergence is measured on.",
)
@click.option("--no-divergence", is_flag=True, help="Skip measuring the pruned model against MODEL.")
@with_runtime
def prune(
    model,
    dst,
    ratio,
    keep,
    by,
    seed,
    export_dir,
    heldout,
    heldout_tokens,
    no_divergence,
    runtime,
    resident,
):
    """Write DST: the packed MODEL with fewer experts in every layer.

    Keeps the same number of experts per layer (config.json's num_experts), chosen by --by from a
    profile of your own text (REAP: mean gate weight x expert output norm, arXiv 2510.13999); drops
    the other experts and their router rows. --profile FILE: the profile to rank by (default:
    profile.json in MODEL; `streamer profile MODEL --text FILE --reap` writes it). Written, verified
    and resumable as `repack` is (run the same command again after an interruption), labelled as
    pruned in its manifest (`streamer info`, chat, /v1/models), and then measured against MODEL on
    held-out text: loss change and top-1 agreement.

    \b
    Examples:
      streamer profile ./packed --text my_work.md --reap
      streamer prune ./packed ./packed-reap25 --ratio 0.25
      streamer prune ./packed ./packed-reap25 --ratio 0.25 --export-checkpoint ./Qwen-REAP25-mlx
    """
    from streamer.loader import read_config
    from streamer.models.args import ModelArgs
    from streamer.storage.packed import open_packed
    from streamer.storage.profile_file import check_profile_matches, default_profile_path, read_profile
    from streamer.storage.prune import make_prune_plan, run_prune
    from streamer.storage.session import model_identity
    from streamer.tuning.saliency import choose_experts, keep_count

    if resident:
        raise ConfigError(
            "prune reads a packed model; run `streamer repack` first (--resident does not apply)"
        )
    if runtime.preload != "none":
        raise ConfigError(
            "--preload does not apply to prune (--profile names the profile to rank experts by)"
        )
    profile_path = Path(runtime.profile) if runtime.profile else None
    if export_dir is not None and export_dir.exists():
        raise ConfigError(f"--export-checkpoint {export_dir}: already exists; give a new directory")
    path = resolve_model(model)
    if dst.resolve() == path.resolve():
        raise ConfigError(f"DST {dst} is MODEL itself; give a new directory for the pruned model")
    packed = open_packed(path)
    args = ModelArgs.from_dict(read_config(packed), source=str(path / "config.json"))
    num_experts = [e.num_experts for e in packed.manifest.layers]
    n = keep_count(min(num_experts), args.num_experts_per_tok, keep, ratio)
    profile, record = None, {"method": by}
    if by == "random":
        record["seed"] = seed
    else:
        where = profile_path or default_profile_path(path)
        if not where.is_file():
            raise ConfigError(f"{where}: no profile; run `streamer profile {model} --text FILE --reap` first")
        profile = read_profile(where)
        check_profile_matches(profile, model_identity(path), num_experts, str(where))
        record["profile"] = {"tokens": profile.tokens, "sources": [s.get("name") for s in profile.sources]}
    kept = choose_experts(profile, num_experts, n, by, seed)
    plan = make_prune_plan(packed, dst, kept, record)
    with progress_bar("pruning") as bar:
        result = run_prune(plan, progress=bar)
    removed = 1 - n / min(num_experts)
    click.echo(
        f"{result.status}: {dst} keeps {n} of {min(num_experts)} experts per layer ({removed:.1%} removed, "
        f"by {by}); experts {packed.manifest.expert_bytes / 1e9:.3f} GB -> {plan.expert_bytes / 1e9:.3f} GB",
        err=True,
    )
    if export_dir is not None:
        from streamer.storage.export import export_checkpoint

        export_checkpoint(open_packed(dst), export_dir)
        click.echo(f"exported the mlx-community checkpoint to {export_dir}", err=True)
    if not no_divergence:
        _report_divergence(path, dst, runtime, heldout, heldout_tokens, profile)


def _report_divergence(path, dst, runtime, heldout, n_tokens, profile) -> None:
    from streamer.tuning.divergence import default_text
    from streamer.tuning.saliency import prune_divergence

    if heldout is None:
        name, text = default_text()
    else:
        if not heldout.is_file():
            raise ConfigError(f"--heldout {heldout}: no such file")
        name, text = heldout.name, heldout.read_text(errors="replace")
    if profile is not None and name in {s.get("name") for s in profile.sources}:
        raise ConfigError(
            f"--heldout {name}: the profile was made from this text; give a text it did not see"
        )
    try:
        d = prune_divergence(path, dst, runtime, text, n_tokens, n_prompt=min(32, n_tokens // 2))
    except ValueError as e:
        raise ConfigError(
            f"held-out text {name}: {e}; give a longer --heldout or fewer --heldout-tokens"
        ) from None
    click.echo(
        f"on {d['positions']} held-out positions of {name}: loss {d['loss_exact']:.4f} -> "
        f"{d['loss_approx']:.4f} ({100 * d['loss_change']:+.2f}%), top-1 agreement "
        f"{100 * d['top1_agreement']:.1f}%, mean KL {d['mean_kl']:.4f} nats",
        err=True,
    )
