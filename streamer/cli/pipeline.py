"""Running a command as one rank of a pipeline started by ``mlx.launch`` (``streamer.distributed``).

Without ``mlx.launch`` (no MLX_RANK / MLX_HOSTFILE / MPI in the environment) nothing changes: the command
opens its engine on this one process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from streamer.cli.options import open_engine, resolve_model, sigint_blocked
from streamer.errors import ConfigError

DEFAULT_TIMEOUT_S = 300.0
# Test hook: "RANK:CALL:exit" or "RANK:CALL:hang" makes that rank die or stop answering at that model call.
FAULT_ENV = "STREAMER_PIPELINE_FAULT"
_LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def pipeline_options(fn):
    """Adds --pipeline-split and --pipeline-timeout; the command gets ``pipeline=(split, timeout_s)``."""

    @click.option(
        "--pipeline-split",
        help="Under mlx.launch: layers per rank, in rank order (e.g. 3,5). Default: balanced by bytes.",
    )
    @click.option(
        "--pipeline-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="Under mlx.launch: seconds a rank waits for another before it stops with an error.",
    )
    @functools.wraps(fn)
    def wrapper(pipeline_split, pipeline_timeout, **kwargs):
        return fn(pipeline=(pipeline_split, pipeline_timeout), **kwargs)

    return wrapper


def launched() -> bool:
    """True when a distributed launcher (mlx.launch, mpirun) started this process."""
    return any(os.environ.get(name) for name in _LAUNCH_ENV)


@dataclass
class PipelineRank:
    """This process's place in a pipeline ``mlx.launch`` started: the group, and its stage's layers."""

    group: object
    path: Path
    layers: range
    config: object  # RuntimeConfig: the cache flags apply per rank
    timeout_s: float

    @property
    def rank(self) -> int:
        return self.group.rank()

    def load_engine(self, exit_on_loss: bool = False):
        """Rank 0's engine (a ``PipelinedEngine``; closing it stops the other ranks). Call it on the thread
        that will run the model: MLX's streams belong to a thread. With ``exit_on_loss`` a rank that goes
        away ends this process with one line (a server: it could answer nothing more)."""
        from streamer.distributed.pipeline import Link, exit_now, make_engine
        from streamer.distributed.stage import load_stage
        from streamer.text.tokenizer import Tokenizer

        with sigint_blocked():
            stage = load_stage(self.path, self.config, self.layers, front=True, rank=self.rank)
        link = Link(self.group, self.timeout_s, on_lost=exit_now if exit_on_loss else None)
        return make_engine(stage, link, Tokenizer(self.path), self.path)

    def serve_until_stopped(self) -> NoReturn:
        """A rank other than 0: serves its stage until rank 0 is done, then ends the command (exit status
        0) without output."""
        from streamer.distributed.pipeline import Link, serve_stage
        from streamer.distributed.stage import load_stage

        # A Ctrl-C in the launch terminal reaches every rank: rank 0 handles it and tells this one to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with sigint_blocked():
            stage = load_stage(self.path, self.config, self.layers, front=False, rank=self.rank)
        try:
            serve_stage(stage, Link(self.group, self.timeout_s), fault=_fault_hook(self.rank))
        finally:
            stage.close()
        sys.stdout.flush()
        sys.exit(0)


def join_pipeline(model: str | None, config, resident: bool, pipeline: tuple) -> PipelineRank | None:
    """This rank's place when ``mlx.launch`` started the command, else None (one process, as usual).

    Raises:
        ConfigError: pipeline flags without mlx.launch, --resident under it, or a bad --pipeline-split.
    """
    split, timeout_s = pipeline
    if not launched():
        if split is not None:
            raise ConfigError(
                "--pipeline-split applies under mlx.launch only; start the ranks with mlx.launch"
            )
        return None
    if resident:
        raise ConfigError(
            "--resident runs on one process; repack the model and pipeline the packed directory"
        )
    from streamer.distributed.split import parse_split, split_by_bytes, stage_costs
    from streamer.distributed.stage import open_stage_packed

    group = _init_group(timeout_s)
    path = resolve_model(model, resident)
    packed = open_stage_packed(path, range(0))
    if split is not None:
        stages = parse_split(split, packed.num_layers, group.size())
    else:
        costs, rest = stage_costs(packed)
        stages = split_by_bytes(costs, group.size(), first_extra=rest)
    return PipelineRank(group, path, stages[group.rank()], config, timeout_s)


@contextlib.contextmanager
def open_engine_for_rank(model: str | None, config, resident: bool, pipeline: tuple):
    """The command's engine: one process as usual, or under mlx.launch this rank's part of the pipeline.

    Rank 0 gets a ``PipelinedEngine`` and runs the command; every other rank serves its stage until
    rank 0 is done and then ends the command (exit status 0) without output.
    """
    rank = join_pipeline(model, config, resident, pipeline)
    if rank is None:
        with open_engine(model, config, resident) as engine:
            yield engine
        return
    if rank.rank != 0:
        rank.serve_until_stopped()
    with rank.load_engine() as engine:
        yield engine


def rank_lines(ranks: list[dict]) -> list[str]:
    """One line per rank of a pipeline's stats (``stats["ranks"]``): its layers and what it did."""
    lines = []
    for r in ranks:
        looked = r["cache_hits"] + r["cache_misses"]
        rate = f"{100 * r['cache_hits'] / looked:.1f}%" if looked else "n/a"
        lines.append(
            f"rank {r['rank']} (layers {r['layers'][0]}-{r['layers'][1]}): expert cache "
            f"{r['cache_bytes'] / 1e9:.2f} GB, hit rate {rate}, read {r['bytes_read'] / 1e9:.3f} GB, "
            f"stalled on I/O {r['stall_s']:.2f} s, waited on the other ranks {r['net_wait_s']:.2f} s, "
            f"sent {r['bytes_sent'] / 1e6:.1f} MB"
        )
    return lines


def refuse_under_pipeline(what: str) -> None:
    """A ConfigError naming ``what`` when the command runs as a pipeline rank (it needs one process)."""
    if launched():
        raise ConfigError(f"{what} runs on one process, not under mlx.launch; start the command without it")


def _init_group(timeout_s: float):
    """``mx.distributed.init`` bounded by ``timeout_s`` (a ring waits for every peer to connect)."""
    import mlx.core as mx

    from streamer.distributed.pipeline import exit_now

    timer = threading.Timer(
        timeout_s, exit_now,
        (f"rank {os.environ.get('MLX_RANK', '?')}: the other ranks did not connect within {timeout_s:g} s; "
         "check the hostfile and that every rank was started",),
    )  # fmt: skip
    timer.daemon = True
    timer.start()
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ConfigError(f"mx.distributed.init failed ({e}); start the ranks with mlx.launch") from None
    finally:
        timer.cancel()
    return group


def _fault_hook(rank: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    want_rank, want_call, action = spec.split(":")
    if int(want_rank) != rank:
        return None

    def fault(call: int) -> None:
        if call == int(want_call):
            if action == "exit":
                os._exit(3)
            time.sleep(10**6)  # "hang": stop answering

    return fault
