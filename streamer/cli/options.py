"""Flags shared by every command that runs a model (generate, chat, serve, bench), and model lookup.

Each flag maps 1:1 to a ``RuntimeConfig`` field; ``--cache-gb`` is converted to bytes here, once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import signal
import sys
import threading
from pathlib import Path

import click

from streamer.errors import ConfigError
from streamer.experts.policy import DEFAULT_POLICY, POLICIES
from streamer.experts.store import IO_MODES
from streamer.loader import Engine, is_packed, load_engine
from streamer.settings import PREFETCH_MODES, PRELOAD_MODES, RuntimeConfig

log = logging.getLogger(__name__)


def runtime_options(command):
    """Adds the expert-cache, I/O and compute flags to a click command."""
    options = [
        click.option(
            "--cache-gb",
            type=float,
            default=None,
            help="Expert cache size in GB (default: 75% of the memory this process may use (RAM, or its "
            "cgroup's limit) minus resident weights and headroom: 4 GB, less below 16 GB). Under mlx.launch, "
            "per rank.",
        ),
        click.option(
            "--cache-experts", type=int, default=None, help="Expert cache size as a number of experts."
        ),
        click.option(
            "--io",
            "io_mode",
            type=click.Choice(IO_MODES),
            default="buffered",
            show_default=True,
            help="buffered: through the OS page cache; direct: bypass it (O_DIRECT / F_NOCACHE).",
        ),
        click.option(
            "--prefetch",
            type=click.Choice(PREFETCH_MODES),
            default="parallel",
            show_default=True,
            help="off: read misses one by one; parallel: read a layer's misses at once; "
            "predict: also guess the next layer's experts early.",
        ),
        click.option(
            "--cache-policy",
            type=click.Choice(POLICIES),
            default=DEFAULT_POLICY,
            show_default=True,
            help="Which cached expert a miss evicts: lfu (least frequently used, with aging; keeps the "
            "experts a model routes to most) or lru (least recently used).",
        ),
        click.option(
            "--preload",
            type=click.Choice(PRELOAD_MODES),
            default="none",
            show_default=True,
            help="Fill the expert cache before the first token: hot = the model's most-routed experts "
            "(from `streamer profile`), all = experts in layer order until full, none = start empty.",
        ),
        click.option(
            "--profile",
            "profile_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="The expert profile --preload hot reads (default: profile.json in the packed model).",
        ),
        click.option(
            "--experts-per-token",
            type=int,
            default=None,
            help="APPROXIMATE: run only the N most probable of the model's top-k experts per token "
            "(scores renormalised as the model does). Default: the model's top-k (exact). "
            "`streamer bench --compare-exact` measures the divergence.",
        ),
        click.option(
            "--cache-bias",
            type=float,
            default=0.0,
            show_default=True,
            help="APPROXIMATE: add this to the router logits of experts already in the expert cache "
            "before top-k (a cached expert replaces an uncached one at most exp(BIAS) times likelier; "
            "fewer reads). 0 = exact routing. Packed (streamed) models only.",
        ),
        click.option("--threads", type=int, default=8, show_default=True, help="Expert reader threads."),
        click.option(
            "--io-timeout",
            type=float,
            default=60.0,
            show_default=True,
            help="Seconds one expert read may take before the request fails (a stalled or detached disk).",
        ),
        click.option(
            "--verify-reads/--no-verify-reads",
            default=False,
            show_default=True,
            help="Check every expert block read against the manifest's CRC-32: a damaged copy fails "
            "the request instead of answering wrong (costs 13-28% of decode time while experts stream).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default=None,
            help="Activation dtype (default: float32 on CPU, bfloat16 on GPU).",
        ),
        click.option(
            "--resident",
            is_flag=True,
            help="Run a source checkpoint with every expert in memory (no repack; needs RAM for all of it).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def runtime_config(
    cache_gb: float | None,
    cache_experts: int | None,
    io_mode: str,
    prefetch: str,
    threads: int,
    dtype: str | None,
    io_timeout: float = 60.0,
    verify_reads: bool = False,
    cache_policy: str = DEFAULT_POLICY,
    preload: str = "none",
    profile_path: str | None = None,
    experts_per_token: int | None = None,
    cache_bias: float = 0.0,
) -> RuntimeConfig:
    """The RuntimeConfig the shared flags describe (validation errors name the flag)."""
    if cache_gb is not None and not (cache_gb > 0 and math.isfinite(cache_gb)):
        raise ConfigError(f"--cache-gb must be a positive number of GB, got {cache_gb:g}")
    if not (io_timeout > 0 and math.isfinite(io_timeout)):
        raise ConfigError(f"--io-timeout must be a positive number of seconds, got {io_timeout:g}")
    return RuntimeConfig(
        cache_bytes=None if cache_gb is None else int(cache_gb * 1e9),
        cache_experts=cache_experts,
        io_mode=io_mode,
        prefetch=prefetch,
        threads=threads,
        dtype=dtype,
        io_timeout_s=io_timeout,
        verify_reads=verify_reads,
        cache_policy=cache_policy,
        preload=preload,
        profile=profile_path,
        experts_per_token=experts_per_token,
        cache_bias=cache_bias,
    )


def pop_runtime_kwargs(kwargs: dict) -> tuple[RuntimeConfig, bool]:
    """Removes the shared flags from a command's kwargs: (RuntimeConfig, resident flag)."""
    resident = kwargs.pop("resident")
    names = ("cache_gb", "cache_experts", "io_mode", "prefetch", "threads", "dtype")
    values = {n: kwargs.pop(n) for n in names}
    io = {"io_timeout": kwargs.pop("io_timeout", 60.0), "verify_reads": kwargs.pop("verify_reads", False)}
    io["cache_policy"] = kwargs.pop("cache_policy", DEFAULT_POLICY)
    io["preload"] = kwargs.pop("preload", "none")
    io["profile_path"] = kwargs.pop("profile_path", None)
    io["experts_per_token"] = kwargs.pop("experts_per_token", None)
    io["cache_bias"] = kwargs.pop("cache_bias", 0.0)
    return runtime_config(**values, **io), resident


def resolve_model(model: str | None, resident: bool = False) -> Path:
    """A model argument to a directory: packed dir, checkpoint (with --resident), hub id, or the demo.

    With no argument the embedded demo model is built (once) and packed (once).
    """
    if model is None:
        from streamer.synthetic.demo import DEMO_NOTICE, demo_packed

        click.echo(DEMO_NOTICE, err=True)
        return demo_packed()
    path = Path(model).expanduser()
    if path.is_dir() and (is_packed(path) or resident):
        return path
    if resident:
        from streamer.storage.paths import resolve_source

        return resolve_source(model)[0]
    from streamer.storage.paths import resolve_packed_model

    return resolve_packed_model(model)


def open_engine(model: str | None, config: RuntimeConfig, resident: bool) -> Engine:
    path = resolve_model(model, resident)
    with sigint_blocked():  # threads MLX starts while loading must not take Ctrl-C (see cli.py)
        with progress_bar("preloading experts") as bar:
            return load_engine(path, config, resident=resident, preload_progress=bar)


@contextlib.contextmanager
def progress_bar(label: str):
    """A ``progress(done, total)`` callback drawing a click progress bar on a terminal; to a pipe or a
    log nothing is written (the bar opens at the first report, so a step that never reports shows none)."""
    state = {}

    def report(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            out = sys.stderr if sys.stderr.isatty() else io.StringIO()
            bar = state["bar"] = click.progressbar(length=max(total, 1), label=label, file=out).__enter__()
            state["shown"] = 0
        bar.update(done - state["shown"])
        state["shown"] = done

    try:
        yield report
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


@contextlib.contextmanager
def sigint_blocked():
    """Blocks SIGINT in this thread for the block; a Ctrl-C pressed meanwhile arrives right after it."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def with_runtime(fn):
    """Decorator: adds the shared flags and passes ``runtime=RuntimeConfig, resident=bool`` instead."""

    @runtime_options
    @functools.wraps(fn)
    def wrapper(**kwargs):
        config, resident = pop_runtime_kwargs(kwargs)
        return fn(runtime=config, resident=resident, **kwargs)

    return wrapper


# The sampling flags chat and serve share: (flag, SamplingParams field, click type, help).
_SAMPLING_FLAGS = (
    ("--temp", "temperature", click.FloatRange(min=0), "Temperature; 0 = greedy."),
    ("--top-p", "top_p", click.FloatRange(0, 1, min_open=True), "Keep the likeliest tokens up to this mass."),
    ("--top-k", "top_k", click.IntRange(min=0), "Keep the k likeliest tokens; 0 = off."),
    ("--min-p", "min_p", click.FloatRange(0, 1, max_open=True),
     "Drop tokens less likely than this fraction of the likeliest."),
    ("--presence-penalty", "presence_penalty", float, "Subtracted from recent tokens' logits."),
    ("--repetition-penalty", "repetition_penalty", click.FloatRange(min=0, min_open=True),
     "Divides recent tokens' logits (1 = off)."),
)  # fmt: skip


def sampling_options(note: str = ""):
    """Adds the sampling flags; the command gets ``sampling_overrides``: SamplingParams field -> value,
    None where the flag was not given (the model's defaults then apply). ``note`` ends every help text."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(**kwargs):
            overrides = {field: kwargs.pop(field) for _, field, _, _ in _SAMPLING_FLAGS}
            return fn(sampling_overrides=overrides, **kwargs)

        for flag, field, kind, text in reversed(_SAMPLING_FLAGS):
            wrapper = click.option(flag, field, type=kind, default=None, help=f"{text}{note}")(wrapper)
        return wrapper

    return decorate
