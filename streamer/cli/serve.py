"""`streamer serve`: an OpenAI- and Anthropic-compatible HTTP server for editors and agents."""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path

import click

from streamer.cli.options import open_engine, sampling_options, with_runtime
from streamer.cli.pipeline import join_pipeline, pipeline_options
from streamer.generation.scheduler import DEFAULT_MAX_BATCH, PREFILL_CHUNK
from streamer.serve.http import ServeConfig, start_server
from streamer.serve.worker import BatchSettings

# The KV + DeltaNet budget of the running requests: half of the 4 GB the default expert cache leaves free
# (experts/budget.py), so a default cache and a full batch still fit.
DEFAULT_STATE_GB = 2.0


@click.command()
@click.argument("model", required=False)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port."
)
@click.option(
    "--api-key",
    envvar="STREAMER_API_KEY",
    default=None,
    help="Require this key (Authorization: Bearer KEY or x-api-key: KEY); also $STREAMER_API_KEY.",
)
@click.option(
    "--served-model-name",
    "model_names",
    multiple=True,
    help="A name clients may request (repeatable; the first is listed by /v1/models).",
)
@click.option("--any-model", is_flag=True, help="Accept every model name (for clients that send their own).")
@click.option(
    "--think/--no-think",
    default=None,
    help="Whether answers think first when a request does not say. Default: the model's own (the demo: no).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Completion budget for requests that set none [default: the model's max_new_tokens, else 4096].",
)
@click.option(
    "--context-length",
    type=click.IntRange(min=2),
    default=None,
    help="Refuse prompt + max_tokens beyond this (default: the model's context length).",
)
@click.option(
    "--prefix-cache-gb",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Memory for conversation-state snapshots that let follow-up requests skip prefill (0 = off).",
)
@click.option(
    "--prefix-cache-entries",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Most snapshots kept (least recently used go first).",
)
@click.option(
    "--cors",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Let browser pages from ORIGIN (e.g. http://localhost:3000; repeatable; * for any) call the API.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="Requests decoded together: a step reads each routed expert once for all (1 = one at a time).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=PREFILL_CHUNK,
    show_default=True,
    help="Prompt tokens read per step while other requests decode: lower keeps their streams steadier.",
)
@click.option(
    "--max-state-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_STATE_GB,
    show_default=True,
    help="Memory for the running requests' KV cache and DeltaNet state, each counted at its longest "
    "(prompt + max_tokens); more requests wait, and one that cannot fit alone is refused.",
)
@sampling_options(" Default for requests that do not set it (else the model's recommendation).")
@pipeline_options
@with_runtime
def serve(
    model, host, port, api_key, model_names, any_model, think, max_tokens, context_length,
    prefix_cache_gb, prefix_cache_entries, cors_origins, max_batch, prefill_chunk, max_state_gb,
    sampling_overrides, runtime, resident, pipeline,
):  # fmt: skip
    """Serve MODEL over HTTP with the OpenAI and Anthropic APIs (the demo model when omitted).

    \b
    Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages; GET /v1/models, /v1/stats, /health.
    Example:
      streamer serve mlx-community/Qwen3.5-35B-A3B-4bit --port 8080
      OPENAI_BASE_URL=http://127.0.0.1:8080/v1 ANTHROPIC_BASE_URL=http://127.0.0.1:8080 your-agent
    """
    config = ServeConfig(
        host=host,
        port=port,
        api_key=api_key,
        model_names=tuple(model_names) or (_model_name(model),),
        accept_any_model=any_model,
        thinking=think,
        default_max_tokens=max_tokens,
        context_length=context_length,
        sampling_overrides={k: v for k, v in sampling_overrides.items() if v is not None},
        prefix_cache_bytes=int(prefix_cache_gb * 1e9),
        prefix_cache_entries=prefix_cache_entries,
        cors_origins=tuple(cors_origins),
        batch=BatchSettings(max_batch, prefill_chunk, int(max_state_gb * 1e9)),
    )
    if not api_key and not _is_loopback(host):
        click.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True
        )
    rank = join_pipeline(model, runtime, resident, pipeline)  # under mlx.launch: rank 0 serves HTTP
    if rank is not None and rank.rank != 0:
        rank.serve_until_stopped()
    if rank is not None:
        load = functools.partial(rank.load_engine, exit_on_loss=True)
    else:
        load = functools.partial(open_engine, model, runtime, resident)
    server = start_server(load, config)
    click.echo(
        f"serving {config.model_names[0]}: OpenAI API at {server.url}/v1, Anthropic API at {server.url}",
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        server.close()


def _model_name(model: str | None) -> str:
    """The id clients see: a hub id as given, a directory by its name, or the demo's."""
    if model is None:
        return "streamer-demo"
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
