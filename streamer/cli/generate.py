"""`streamer generate`: one prompt in, tokens out — the scripting interface for tests and benchmarks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from streamer.cli.options import sampling_options, with_runtime
from streamer.cli.pipeline import open_engine_for_rank, pipeline_options, rank_lines
from streamer.errors import ConfigError
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler, model_thinks_by_default
from streamer.loader import describe_routing
from streamer.tuning.trace import RouteTrace


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ConfigError("--prompt-ids is empty")
    if min(ids) < 0:
        raise ConfigError(f"--prompt-ids: token ids are never negative, got {min(ids)}")
    return ids


@click.command()
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Prompt text (the chat template is applied unless --raw).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids (no template).")
@click.option("--raw", is_flag=True, help="Send --prompt to the model as is, without the chat template.")
@click.option(
    "--think/--no-think",
    default=None,
    help="Render the template with thinking on or off. Default: the model's own (the demo: off).",
)
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=100, show_default=True)
@sampling_options(note=" Off unless given: generate decodes greedily.")
@click.option(
    "--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Seed for sampling (reproducible runs)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: token_ids, text, stats.")
@click.option("--stats", "show_stats", is_flag=True, help="Print a cache / I/O summary to stderr.")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), help="Write routing as JSON lines.")
@pipeline_options
@with_runtime
def generate(
    model, prompt, prompt_ids, raw, think, max_tokens, seed,
    as_json, show_stats, trace, runtime, resident, sampling_overrides, pipeline,
):  # fmt: skip
    """Generate text from MODEL (a packed model, a hub id packed before, or the demo when omitted).

    \b
    Examples:
      streamer generate mlx-community/Qwen3.5-35B-A3B-4bit -p "Why is the sky blue?" --stats
      streamer generate ./packed --prompt-ids 1,2,3 -n 32 --json --cache-gb 8
    """
    if (prompt is None) == (prompt_ids is None):
        raise ConfigError("give exactly one of --prompt and --prompt-ids")
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty; pass some text (or token ids with --prompt-ids)")
    if prompt is not None:
        _check_utf8(prompt)
    # Unlike chat, generate ignores the model's sampling defaults: greedy unless a flag says otherwise.
    given = {name: value for name, value in sampling_overrides.items() if value is not None}
    params = SamplingParams(**given, seed=seed)
    prompt_ids = None if prompt_ids is None else _parse_ids(prompt_ids)
    with open_engine_for_rank(model, runtime, resident, pipeline) as engine:
        tok = engine.tokenizer
        if engine.routing["mode"] != "exact" and not as_json:  # --json carries it in stats.routing
            click.echo(describe_routing(engine.routing), err=True)
        if prompt_ids is not None:
            ids = prompt_ids
            if max(ids) >= engine.args.vocab_size:
                raise ConfigError(
                    f"--prompt-ids: id {max(ids)} is outside the vocabulary (size {engine.args.vocab_size})"
                )
        elif raw:
            ids = tok.encode(prompt)
        else:
            thinking = model_thinks_by_default(tok.generation_config) if think is None else think
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=thinking)
            ids = tok.encode(text)
        _check_context(len(ids), max_tokens, engine.args.max_position_embeddings)
        sampler = make_sampler(params, context=ids)  # penalties (if any) see the prompt too
        tracer = RouteTrace(trace) if trace else None
        if engine.runtime and tracer:
            engine.runtime.on_route = tracer
        start = time.perf_counter()
        tokens, pieces, last = [], [], None
        try:
            for r in stream_generate(engine.model, tok, ids, sampler, max_tokens):  # stats: once, below
                tokens.append(r.token)
                pieces.append(r.text)
                if not as_json:
                    click.echo(r.text, nl=False)
                last = r
        finally:
            if tracer:
                tracer.close()
        wall = time.perf_counter() - start
        stats = {
            **engine.stats(),
            "prompt_tokens": len(ids),
            "generated_tokens": len(tokens),
            "prompt_tps": last.prompt_tps,
            "decode_tps": last.generation_tps,
            "wall_s": wall,
            "finish_reason": last.finish_reason,
        }
    if as_json:
        click.echo(json.dumps({"token_ids": tokens, "text": "".join(pieces), "stats": stats}))
    else:
        click.echo()
    if show_stats:
        _print_stats(stats)


def _check_utf8(prompt: str) -> None:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 arrive from argv as lone surrogates
        raise ConfigError(
            f"--prompt is not valid UTF-8 (at character {e.start}); check the terminal's or file's encoding"
        ) from None


def _check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if prompt_tokens + max_tokens > context:
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens and --max-tokens {max_tokens}, together more than the "
            f"model's context of {context} tokens; shorten the prompt or lower --max-tokens"
        )


def _print_stats(s: dict) -> None:
    lines = [
        f"prompt: {s['prompt_tokens']} tokens at {s['prompt_tps']:.1f} tok/s; "
        f"decode: {s['generated_tokens']} tokens at {s['decode_tps']:.2f} tok/s",
    ]
    if "cache_hits" in s:
        looked = s["cache_hits"] + s["cache_misses"]
        lines.append(
            f"expert cache {s['cache_bytes'] / 1e9:.2f} GB: "
            f"{s['cache_hits']} hits, {s['cache_misses']} misses "
            f"({100 * s['cache_hits'] / max(looked, 1):.1f}% hit rate); read {s['bytes_read'] / 1e9:.3f} GB "
            f"({s['bytes_read'] / 1e9 / max(s['wall_s'], 1e-9):.2f} GB/s over the run); "
            f"stalled on I/O {s['stall_s']:.2f} s ({100 * s['stall_s'] / max(s['wall_s'], 1e-9):.0f}%)"
        )
        if s.get("predicted"):
            lines.append(f"next-layer prediction: {100 * s['predicted_right'] / s['predicted']:.1f}% right")
    lines.append(describe_routing(s["routing"], short=True))
    lines += rank_lines(s.get("ranks", []))
    for line in lines:
        click.echo(line, err=True)
    sys.stderr.flush()
