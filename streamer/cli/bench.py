"""`streamer bench` (speed on this machine) and `streamer advise` (which --cache-gb, from a trace)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamer.cli.options import resolve_model, with_runtime
from streamer.cli.pipeline import open_engine_for_rank, pipeline_options, rank_lines, refuse_under_pipeline
from streamer.errors import ConfigError


@click.command()
@click.argument("model", required=False)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--decode-tokens", "-n", type=click.IntRange(min=2), default=64, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Streams decoded together, as `serve` batches concurrent requests (each prompt a rotation of the "
    "same text); decode tok/s is then the aggregate over the streams.",
)
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), help="Write routing as JSON lines.")
@click.option(
    "--disk-test/--no-disk-test",
    default=True,
    show_default=True,
    help="Also time random reads of the model's expert blocks (about 2 s).",
)
@click.option(
    "--compare-exact",
    is_flag=True,
    help="Also measure how far these flags' routing is from exact routing: the model reads a held-out "
    "text teacher-forced twice (exact, then as flagged); prints top-1 agreement, KL and loss change, "
    "and each run's cache misses and bytes read.",
)
@click.option(
    "--compare-tokens",
    type=click.IntRange(min=3),
    default=256,
    show_default=True,
    help="Tokens of text for --compare-exact (the first 64, at most half, are the prompt).",
)
@click.option(
    "--compare-text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The text --compare-exact reads (default: streamer's own Python sources).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pipeline_options
@with_runtime
def bench(
    model, prompt_tokens, decode_tokens, concurrency, trace, disk_test, compare_exact, compare_tokens,
    compare_text, as_json, runtime, resident, pipeline,
):  # fmt: skip
    """Measure prompt and decode speed of MODEL (the demo when omitted) with the given cache flags.

    Prints prompt and decode tok/s, the expert cache hit rate, GB/s read and the share of time stalled
    on I/O. With --trace, the routing is saved for `streamer advise`. With --compare-exact, the
    approximate-routing flags (--experts-per-token, --cache-bias) are measured against exact routing.

    \b
    Examples:
      streamer bench mlx-community/Qwen3.5-35B-A3B-4bit --cache-gb 8
      streamer bench ./packed --trace route.jsonl --json
      streamer bench ./packed --cache-gb 8 --cache-bias 1 --compare-exact
    """
    from streamer.loader import load_engine
    from streamer.tuning.bench import bench_prompt, measure_read_gbps, run_bench
    from streamer.tuning.divergence import measure_divergence
    from streamer.tuning.trace import RouteTrace

    if trace:
        refuse_under_pipeline("--trace")
    if compare_exact:
        refuse_under_pipeline("--compare-exact")
    with open_engine_for_rank(model, runtime, resident, pipeline) as engine:
        if trace and engine.runtime is None:
            raise ConfigError(
                "--trace needs a packed model (a --resident run has no expert routing to record)"
            )
        tracer = RouteTrace(trace) if trace else None
        try:
            prompt = bench_prompt(engine, prompt_tokens)
            result = run_bench(engine, prompt, decode_tokens, on_route=tracer, concurrency=concurrency)
        finally:
            if tracer:
                tracer.close()
        if disk_test and engine.runtime is not None:
            gbps, mode = measure_read_gbps(engine.path, threads=runtime.threads)
            result["disk"] = {"read_gbps": gbps, "io_mode": mode}
        result["routing"] = dict(engine.routing)
        path = engine.path
        if compare_exact:  # tokenized now; the comparison's two runs load fresh engines, one at a time
            text, ids = _compare_ids(engine, compare_text, compare_tokens)
    if compare_exact:
        n_prompt = min(64, compare_tokens // 2)
        divergence = measure_divergence(
            lambda cfg: load_engine(path, cfg, resident=resident), runtime, ids, n_prompt
        )
        result["compare_exact"] = {"text": text, "prompt_tokens": n_prompt, **divergence}
    if trace:
        result["trace"] = str(trace)
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_bench(result)


def _compare_ids(engine, text_file: Path | None, n_tokens: int) -> tuple[str, list[int]]:
    from streamer.tuning.divergence import default_text, text_ids

    if text_file is None:
        name, text = default_text()
    else:
        name, text = str(text_file), text_file.read_text(encoding="utf-8", errors="replace")
    try:
        return name, text_ids(engine, text, n_tokens)
    except ValueError as e:
        fix = "give a longer text or fewer --compare-tokens"
        raise ConfigError(f"--compare-text {name}: {e}; {fix}") from None


def _print_bench(r: dict) -> None:
    from streamer.loader import describe_routing
    from streamer.tuning.divergence import describe

    _print_speed(r)
    click.echo(f"routing: {describe_routing(r['routing'])}")
    for line in rank_lines(r.get("ranks", [])):
        click.echo(line)
    if "compare_exact" in r:
        c = r["compare_exact"]
        click.echo(
            f"vs exact routing, teacher-forced on {c['text']} ({c['prompt_tokens']} prompt tokens, then "
            "decode steps; each run by a freshly loaded engine):"
        )
        for line in describe(c):
            click.echo(f"  {line}")


def _print_speed(r: dict) -> None:
    p, d = r["prompt"], r["decode"]
    click.echo(f"prompt: {p['tokens']} tokens at {p['tps']:.1f} tok/s")
    streams = r.get("concurrency", 1)
    together = f" ({streams} streams together, aggregate)" if streams > 1 else ""
    click.echo(
        f"decode: {d['tokens']} tokens at {d['tps']:.2f} tok/s{together} "
        f"({r['compute_ms_per_token']:.1f} ms/token not stalled on I/O)"
    )
    if r["streamed"] and d["tokens"]:
        click.echo(f"  expert bytes read per generated token: {_size(d['bytes_read'] / d['tokens'])}")
    if not r["streamed"]:
        click.echo("resident: every expert in memory (no cache statistics)")
        return
    click.echo(f"expert cache: {_size(r['cache_bytes'])} of {_size(r['expert_bytes'])} of experts")
    for name, s in (("prompt", p), ("decode", d)):
        hit = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
        click.echo(
            f"  {name}: hit rate {hit}, read {_size(s['bytes_read'])} at {s['read_gbps']:.3f} GB/s, "
            f"stalled on I/O {100 * s['stall_share']:.0f}% of the time"
        )
    if "disk" in r:
        disk = r["disk"]
        click.echo(f"disk: random expert-block reads at {disk['read_gbps']:.2f} GB/s ({disk['io_mode']} I/O)")
    if "trace" in r:
        gbps = f" --read-gbps {r['disk']['read_gbps']:.2f}" if "disk" in r else ""
        click.echo(
            f"next: streamer advise {r['trace']} --model {r['model']} "
            f"--compute-ms {r['compute_ms_per_token']:.1f}{gbps}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{flag} needs positive numbers, got {text!r}")
    return values


@click.command()
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--model", "-m", help="The packed model the trace was recorded with (for GB and tok/s).")
@click.option(
    "--cache-gb", "cache_gb", help="Cache sizes to try, comma-separated (default: 5%-100% of experts)."
)
@click.option("--slots", help="Without --model: cache sizes in experts, comma-separated.")
@click.option(
    "--compute-ms", type=click.FloatRange(min=0), help="Compute per decode token (from `streamer bench`)."
)
@click.option(
    "--read-gbps",
    type=click.FloatRange(min=0, min_open=True),
    help="Disk read speed (default with --model: measured now, about 2 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def advise(trace, model, cache_gb, slots, compute_ms, read_gbps, as_json):
    """Hit rate and expected decode tok/s per expert-cache size, from a routing TRACE.

    Record TRACE on your machine with `streamer bench MODEL --trace FILE` (or `streamer generate ...
    --trace FILE`), then replay it here: every cache size is simulated with each of the runtime's own
    policies (--cache-policy lru / lfu; for reference, the optimal policy), so you can choose --cache-gb
    and --cache-policy from evidence.

    \b
    Examples:
      streamer advise route.jsonl --model mlx-community/Qwen3.5-35B-A3B-4bit --compute-ms 45
      streamer advise route.jsonl --model ./packed --cache-gb 8,16,32 --read-gbps 5 --json
    """
    from streamer.tuning.advise import advise_slots, recommend_policy
    from streamer.tuning.cache_sim import read_trace

    steps = read_trace(trace)
    info: dict = {"trace": str(trace)}
    if model is None:
        if cache_gb or compute_ms is not None or read_gbps:
            raise ConfigError(
                "--cache-gb, --compute-ms and --read-gbps need --model (block sizes come from it)"
            )
        counts = _floats(slots, "--slots")
        rows = advise_slots(steps, None if counts is None else [int(c) for c in counts])
    else:
        rows, info = _advise_model(steps, model, cache_gb, compute_ms, read_gbps, info)
    info["recommended_policy"] = recommend_policy(rows)
    if as_json:
        click.echo(json.dumps({**info, "rows": [r.__dict__ for r in rows]}))
    else:
        _print_advice(rows, info)


def _advise_model(steps, model, cache_gb, compute_ms, read_gbps, info):
    from streamer.models.args import ModelArgs, read_config_file
    from streamer.storage.packed import read_manifest
    from streamer.tuning.advise import advise_model
    from streamer.tuning.bench import measure_read_gbps

    path = resolve_model(model)
    manifest = read_manifest(path)
    args = ModelArgs.from_dict(read_config_file(path))
    if read_gbps is None:
        read_gbps, mode = measure_read_gbps(path)
        info["read_gbps_measured"] = {"gbps": read_gbps, "io_mode": mode}
    budgets = _floats(cache_gb, "--cache-gb")
    rows = advise_model(
        steps,
        manifest,
        args,
        None if budgets is None else [int(b * 1e9) for b in budgets],
        compute_ms,
        read_gbps,
    )
    info.update(model=str(path), compute_ms=compute_ms, read_gbps=read_gbps)
    return rows, info


def _print_advice(rows, info: dict) -> None:
    with_gb = rows[0].cache_bytes is not None
    policies = list(rows[0].policy_hit_rates)
    head = f"{'cache' if with_gb else 'slots':>9} {'experts':>8}"
    head += "".join(f" {p:>7}" for p in policies) + f" {'optimal':>8}"
    if with_gb:
        head += f" {'MB/token':>9} {'tok/s':>7} {'overlap':>8}"
    click.echo(head)
    for r in rows:
        line = f"{_size(r.cache_bytes):>9} " if with_gb else f"{r.slots:>9d} "
        line += f"{100 * r.share:>7.1f}%"
        line += "".join(f" {100 * r.policy_hit_rates[p]:>6.1f}%" for p in policies)
        line += f" {100 * r.optimal_hit_rate:>7.1f}%"
        if with_gb:
            line += f" {r.missed_mb_per_token:>9.1f}"
            if r.serial_tps is not None:
                line += f" {r.serial_tps:>7.2f} {r.overlapped_tps:>8.2f}"
        click.echo(line)
    click.echo(
        f"recommended: --cache-policy {info['recommended_policy']} (most hits over these sizes; "
        "MB/token and tok/s are for the best policy at each size)"
    )
    if not with_gb:
        click.echo("(experts = share of the experts the trace touches; pass --model for GB and tok/s)")
        return
    measured = " (measured now)" if "read_gbps_measured" in info else ""
    compute = info["compute_ms"]
    click.echo(
        f"tok/s = 1 / (compute + MB/token / {info['read_gbps']:.2f} GB/s{measured}); overlap = reads fully "
        f"hidden behind compute. Compute per token: "
        + (
            f"{compute:g} ms"
            if compute is not None
            else "not given (I/O only; pass --compute-ms from `streamer bench`)"
        )
    )
