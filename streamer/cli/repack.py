"""`streamer repack | verify | info | list`: make, check and inspect packed models (formats/PACKED.md)."""

from __future__ import annotations

import io
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

from streamer.errors import PackedFormatError
from streamer.models.args import CONFIG_FILE, read_config_file
from streamer.storage.packed import repair_hint
from streamer.storage.packed_format import PROGRESS_FILE, LayerEntry, Manifest, describe_layers, pruned_label
from streamer.storage.paths import list_packed_dirs, model_id_from_dir_name, models_dir, resolve_packed_model
from streamer.storage.repack import destination_status, plan_for_destination, run_repack
from streamer.storage.repack_plan import RepackPlan, make_plan, parse_layers
from streamer.storage.verify import (
    bytes_to_check,
    check_held_files,
    read_any_manifest,
    select_layers,
    verify_packed,
)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class _Bar:
    """A click progress bar over bytes that shows GB done and the rate of this run.

    Only on a terminal: to a pipe or a log, click would print the bare label, a line that reads like a
    message (the command's own summary line says what was done).
    """

    def __init__(self, label: str, total: int):
        self._bar = click.progressbar(
            length=total,
            label=label,
            file=sys.stderr if sys.stderr.isatty() else io.StringIO(),
            item_show_func=lambda text: text,
        )
        self._start, self._shown, self._first = time.monotonic(), 0, None

    def __enter__(self) -> _Bar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def absolute(self, done: int, total: int) -> None:
        if self._first is None:
            self._first = done  # bytes already done by an earlier, interrupted run
        rate = (done - self._first) / max(time.monotonic() - self._start, 1e-9)
        text = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB  {rate / 1e9:.2f} GB/s"
        self._bar.update(done - self._shown, current_item=text)
        self._shown = done

    def step(self, n: int) -> None:
        self.absolute(self._shown + n, self._bar.length)


class _Phases:
    """One progress bar per phase (a complete copy's re-check, then the repack), each opened when its
    phase first reports, so a copy that needs no work shows no repack bar."""

    def __init__(self):
        self._bar: _Bar | None = None
        self._label: str | None = None

    def on(self, label: str):
        def report(done: int, total: int) -> None:
            if self._label != label:
                self.__exit__(None, None, None)
                self._bar, self._label = _Bar(label, total).__enter__(), label
            self._bar.absolute(done, total)

        return report

    def __enter__(self) -> _Phases:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None


def layer_summaries(layers: Sequence[LayerEntry]) -> list[str]:
    """One line per run of consecutive layers with the same expert count, block size and quantization."""

    def describe(e: LayerEntry) -> str:
        parts = []
        for c in e.components:
            if c.name.endswith(".weight"):
                q = f"{c.bits}-bit g{c.group_size}" if c.bits else c.dtype.lower()
                parts.append(f"{c.name.split('.')[0]} {q}")
        return f"{e.num_experts} experts × {e.block_bytes:,} B blocks: {', '.join(parts)}"

    lines: list[str] = []
    runs: list[tuple[int, int, str]] = []
    for e in layers:
        d = describe(e)
        if runs and runs[-1][2] == d and runs[-1][1] == e.layer - 1:
            runs[-1] = (runs[-1][0], e.layer, d)
        else:
            runs.append((e.layer, e.layer, d))
    for first, last, d in runs:
        name = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"  {name:14} {d}")
    return lines


def _held(plan_or_manifest) -> str:
    """What a plan writes or a copy holds: "8 layers", or "layers 4-7 of 8 (a pipeline stage's copy)"."""
    stage, n = plan_or_manifest.stage, len(plan_or_manifest.layers)
    if stage is None:
        return f"{n} layers"
    return f"{describe_layers(stage.layers)} of {n} (a pipeline stage's copy)"


def describe_plan(plan: RepackPlan) -> str:
    plan = plan_for_destination(plan)
    status, journal = destination_status(plan)
    if status == "adopt":
        status = f"another copy of this model: the {len(journal.layers)} layers it holds are kept if intact"
    elif status == "resume":
        res = "resident + " if journal.resident_crc32 is not None else ""
        status = f"resume ({res}{len(journal.layers)} of {len(plan.layers)} layers already done)"
    elif status == "repair":
        status = "damaged: repack rewrites the damaged files"
    elif status == "complete":
        status = "complete: repack re-checks every checksum, then repairs what is damaged"
    probe = plan.dst
    while not probe.exists():
        probe = probe.parent
    ckpt = plan.checkpoint
    lines = [
        f"source    {plan.source_name}  ({ckpt.path})  {ckpt.model_type}",
        f"dest      {plan.dst}  [{status}]",
        f"resident  {len(plan.resident)} tensors, {_size(plan.resident_bytes)}  -> resident.safetensors",
        f"experts   {_held(plan)}, {_size(plan.expert_bytes)}  -> experts/layer_NNN.bin",
        *layer_summaries(plan.held_layers),
        f"files     {', '.join(p.name for p in ckpt.extra_files)}",
        f"total     {_size(plan.total_bytes + plan.files_bytes)}; "
        f"{_size(shutil.disk_usage(probe).free)} free",
    ]
    return "\n".join(lines)


@click.command()
@click.argument("src")
@click.argument("dst", required=False, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan and sizes, write nothing.")
@click.option(
    "--layers",
    metavar="FIRST:LAST",
    help="Write only what the pipeline stage holding layers FIRST to LAST (both included, counted from 0; "
    "e.g. 0:23) needs under mlx.launch: their expert files and resident tensors, plus the embedding and "
    "output head when FIRST is 0. The copy runs only as that stage's rank; `streamer repack SRC DST` "
    "later completes it into a whole model, keeping the layers it has.",
)
def repack(src: str, dst: Path | None, dry_run: bool, layers: str | None) -> None:
    """Lay out SRC's experts for streaming (once per model).

    SRC is an mlx-community checkpoint directory, or a Hugging Face id already in the local hub
    cache. DST defaults to the streamer data dir, where `streamer chat SRC` finds it. Safe to
    interrupt: run the same command again to resume where it stopped.
    """
    plan = make_plan(src, dst, layers)
    if dry_run:
        click.echo(describe_plan(plan))
        return
    staged = plan.stage is not None
    plan = plan_for_destination(plan)
    if staged and plan.stage is None:
        click.echo(f"{plan.dst} holds the whole model, which serves every stage: checking it", err=True)
    what = _held(plan)
    click.echo(f"repacking {plan.source_name} -> {plan.dst} ({what}, {_size(plan.total_bytes)})", err=True)
    with _Phases() as bars:
        result = run_repack(plan, progress=bars.on("repack"), check_progress=bars.on("check"))
    if result.status == "already packed":
        click.echo(
            f"already packed: {plan.dst} (every checksum re-checked in {result.seconds:.1f} s)", err=True
        )
        return
    rate = result.bytes_written / max(result.seconds, 1e-9)
    if result.status == "repaired":
        what = f"{_size(result.bytes_written)} of damaged files in"
    else:
        what = f"{_held(plan)} into"
    click.echo(
        f"{result.status} {what} {plan.dst} in {result.seconds:.1f} s "
        f"({rate / 1e9:.2f} GB/s); verified as written",
        err=True,
    )


@click.command()
@click.argument("model")
@click.option(
    "--layers",
    metavar="FIRST:LAST",
    help="Check only these layers' expert files (both included, counted from 0), with the resident and "
    "copied files: one pipeline stage's share. Default: every layer the copy holds.",
)
def verify(model: str, layers: str | None) -> None:
    """Re-check every checksum and bound of a packed MODEL (a directory or a packed id).

    A pipeline stage's copy (`streamer repack --layers`) is checked over the layers it holds.
    """
    path = resolve_packed_model(model)
    manifest = read_any_manifest(path)
    wanted = None if layers is None else parse_layers(layers, len(manifest.layers))
    entries = select_layers(manifest, wanted)
    total = bytes_to_check(path, manifest, entries)
    start = time.monotonic()
    with _Bar("verify", total) as bar:
        verify_packed(path, progress=bar.step, layers=wanted)
    secs = time.monotonic() - start
    n = sum(e.num_experts for e in entries)
    kind = " (a pipeline stage's copy)" if manifest.stage else ""
    click.echo(
        f"ok: {path}: {describe_layers(e.layer for e in entries)} of {len(manifest.layers)}{kind}: "
        f"{n} expert blocks, {len(manifest.resident_crc32)} resident tensors match ({secs:.1f} s)"
    )


@click.command()
@click.argument("model")
def info(model: str) -> None:
    """Print a packed MODEL's source, shape and sizes (resident vs streamed expert bytes)."""
    path = resolve_packed_model(model)
    m = read_any_manifest(path)
    try:
        check_held_files(path, m)
    except PackedFormatError as e:
        raise PackedFormatError(f"{e}; {repair_hint(path, m)}") from None
    config = read_config_file(path, fix=repair_hint(path, m, path / CONFIG_FILE), error=PackedFormatError)
    tc = config.get("text_config") or config
    counts = sorted({e.num_experts for e in m.layers})
    experts = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (per layer)"
    lines = [
        f"model      {m.source.get('name')}  ({m.model_type})",
        f"path       {path}",
        f"format     streamer-packed v1, config sha256 {m.source.get('config_sha256', '')[:12]}",
        f"shape      {len(m.layers)} layers, hidden {tc.get('hidden_size')}, experts {experts}, "
        f"top-{tc.get('num_experts_per_tok')}",
        f"resident   {_size(m.resident_bytes)} ({len(m.resident_crc32)} tensors, loaded into memory)",
        f"experts    {_size(m.expert_bytes)} (streamed from disk)",
        *layer_summaries(m.held_layers),
        f"total      {_size(m.total_bytes)}",
    ]
    if pruned_label(m):
        lines.insert(1, f"pruned     {pruned_label(m)}")
    if m.stage is not None:
        lines.insert(1, f"stage      {_held(m)}: runs only as that stage's rank under mlx.launch")
    click.echo("\n".join(lines))


@click.command(name="list")
def list_models() -> None:
    """List the packed models in the streamer data dir with their sizes."""
    dirs = list_packed_dirs()
    if not dirs:
        click.echo(f'no packed models in {models_dir()}; run "streamer repack ID" to make one')
        return
    rows = []
    for d in dirs:
        model_id = model_id_from_dir_name(d.name)
        if (d / PROGRESS_FILE).is_file() and not (d / "manifest.json").is_file():
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            rows.append((model_id, _size(size), f'incomplete: run "streamer repack {model_id}" to resume'))
            continue
        try:
            m: Manifest = read_any_manifest(d)
            rows.append((model_id, _size(m.total_bytes), f"{_held(m)}, {m.model_type}"))
        except PackedFormatError as e:  # one broken entry must not hide the others
            rows.append((model_id, "?", f"unreadable: {e}"))
    width = max(len(r[0]) for r in rows)
    for model_id, size, note in rows:
        click.echo(f"{model_id:{width}}  {size:>10}  {note}")
