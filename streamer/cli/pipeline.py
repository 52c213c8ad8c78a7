"""Running a command as one rank of a pipeline started by ``mlx.launch`` (``streamer.distributed``).

Without ``mlx.launch`` (no MLX_RANK / MLX_HOSTFILE / MPI in the environment) nothing changes: the command
opens its engine on this one process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time

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


@contextlib.contextmanager
def open_engine_for_rank(model: str | None, config, resident: bool, pipeline: tuple):
    """The command's engine: one process as usual, or under mlx.launch this rank's part of the pipeline.

    Rank 0 gets a ``PipelinedEngine`` and runs the command; every other rank serves its stage until
    rank 0 is done and then ends the command (exit status 0) without output.
    """
    split, timeout_s = pipeline
    if not launched():
        if split is not None:
            raise ConfigError(
                "--pipeline-split applies under mlx.launch only; start the ranks with mlx.launch"
            )
        with open_engine(model, config, resident) as engine:
            yield engine
        return
    if resident:
        raise ConfigError(
            "--resident runs on one process; repack the model and pipeline the packed directory"
        )
    from streamer.distributed.pipeline import Link, make_engine, serve_stage
    from streamer.distributed.split import parse_split, split_by_bytes, stage_costs
    from streamer.distributed.stage import load_stage, open_stage_packed
    from streamer.text.tokenizer import Tokenizer

    group = _init_group(timeout_s)
    rank, size = group.rank(), group.size()
    path = resolve_model(model, resident)
    packed = open_stage_packed(path, range(0))
    if split is not None:
        stages = parse_split(split, packed.num_layers, size)
    else:
        costs, rest = stage_costs(packed)
        stages = split_by_bytes(costs, size, first_extra=rest)
    link = Link(group, timeout_s)
    with sigint_blocked():
        stage = load_stage(path, config, stages[rank], front=rank == 0)
    try:
        if rank != 0:
            serve_stage(stage, link, fault=_fault_hook(rank))
            sys.stdout.flush()
            sys.exit(0)
        with make_engine(stage, link, Tokenizer(path), path) as engine:
            yield engine
    finally:
        stage.close()


def _init_group(timeout_s: float):
    """``mx.distributed.init`` bounded by ``timeout_s`` (a ring waits for every peer to connect)."""
    import mlx.core as mx

    from streamer.distributed.pipeline import _exit_unanswered

    timer = threading.Timer(
        timeout_s, _exit_unanswered,
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
