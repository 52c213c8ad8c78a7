"""How far approximate routing moves a model's output from its exact output, measured teacher-forced.

One token stream (held-out text) is run twice, each time by a freshly loaded engine so that both runs start
from the same cache state: once with exact routing, once with the approximate flags. A run prefills a
prompt, then feeds each following token as a decode step (teacher forcing: both runs see the same tokens,
whatever either would have generated) and keeps every position's log-probabilities. Reported:

- ``top1_agreement``: share of positions where the two runs' most probable next tokens are the same;
- ``mean_kl``: mean over positions of KL(exact || approx) in nats;
- ``loss_exact`` / ``loss_approx``: mean negative log-likelihood of the actual next token, and
  ``loss_change``: approx / exact - 1;
- each run's expert-cache counters over the decode steps (hits, misses, bytes read).

Names: N = positions compared, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from streamer.generation.generate import prefill
from streamer.loader import Engine
from streamer.settings import RuntimeConfig

COUNTERS = ("cache_hits", "cache_misses", "bytes_read")


@dataclass
class PassResult:
    """One teacher-forced run: log-probabilities [N, V] of each position, the actual next tokens [N], and
    the expert-cache counters of its decode steps."""

    logprobs: np.ndarray
    targets: np.ndarray
    counters: dict
    routing: dict


def teacher_forced(engine: Engine, ids: Sequence[int], n_prompt: int) -> PassResult:
    """Prefills ``ids[:n_prompt]``, then feeds ``ids[n_prompt:-1]`` one token per decode step.

    Positions are the prefill's last one and every decode step: N = len(ids) - n_prompt.

    Raises:
        ValueError: fewer than one prompt token or nothing left to predict.
    """
    if not 1 <= n_prompt < len(ids):
        raise ValueError(f"need 1 <= prompt tokens < {len(ids)} tokens of text, got {n_prompt}")
    model, cache = engine.model, engine.model.make_cache()
    rows = [_logprobs(prefill(model, list(ids[:n_prompt]), cache))]
    before = engine.stats()
    for token in ids[n_prompt:-1]:
        rows.append(_logprobs(model(mx.array([[token]]), cache=cache)[0, -1]))
    after = engine.stats()
    counters = {k: after[k] - before[k] for k in COUNTERS if k in after}
    targets = np.asarray(ids[n_prompt:], dtype=np.int64)
    return PassResult(np.stack(rows), targets, counters, dict(after.get("routing", {"mode": "exact"})))


def _logprobs(logits: mx.array) -> np.ndarray:
    logits = logits.astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))  # [V]


def compare(exact: PassResult, approx: PassResult) -> dict:
    """Top-1 agreement, mean KL(exact || approx), both losses and both runs' counters.

    Raises:
        ValueError: the runs did not see the same tokens.
    """
    if exact.logprobs.shape != approx.logprobs.shape or not np.array_equal(exact.targets, approx.targets):
        raise ValueError("the two runs must be teacher-forced on the same tokens")
    p, q = exact.logprobs.astype(np.float64), approx.logprobs.astype(np.float64)  # [N, V]
    kl = (np.exp(p) * (p - q)).sum(axis=-1)  # [N]
    rows = np.arange(len(exact.targets))
    loss_exact = float(-p[rows, exact.targets].mean())
    loss_approx = float(-q[rows, approx.targets].mean())
    return {
        "positions": len(rows),
        "top1_agreement": float((p.argmax(axis=-1) == q.argmax(axis=-1)).mean()),
        "mean_kl": float(max(kl.mean(), 0.0)),  # >= 0 in exact arithmetic; rounding can dip below
        "loss_exact": loss_exact,
        "loss_approx": loss_approx,
        "loss_change": loss_approx / loss_exact - 1 if loss_exact else 0.0,
        "exact": dict(exact.counters),
        "approx": dict(approx.counters),
        "routing": approx.routing,
    }


def exact_config(config: RuntimeConfig) -> RuntimeConfig:
    """``config`` with the approximate-routing flags off (everything else, the cache above all, kept)."""
    return dataclasses.replace(config, experts_per_token=None, cache_bias=0.0)


def measure_divergence(
    load: Callable[[RuntimeConfig], Engine], config: RuntimeConfig, ids: Sequence[int], n_prompt: int
) -> dict:
    """Runs ``ids`` teacher-forced with ``exact_config(config)``, then with ``config``; returns ``compare``.

    ``load(config)`` opens a fresh engine (each run starts from the same cache state: cold, or what
    ``--preload`` puts there); one engine is open at a time.
    """
    runs = []
    for cfg in (exact_config(config), config):
        with load(cfg) as engine:
            runs.append(teacher_forced(engine, ids, n_prompt))
    return compare(*runs)


def default_text() -> tuple[str, str]:
    """(name, text): this package's own Python sources, sorted: held out from the demo models' training
    (the Python standard library) and present wherever streamer is installed."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.rglob("*.py"))
    return f"{root.name}/**/*.py ({len(files)} files)", "\n".join(f.read_text() for f in files)


def text_ids(engine: Engine, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` of ``text`` in the model's tokenizer.

    Raises:
        ValueError: the text is shorter than that.
    """
    ids = engine.tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return ids[:n_tokens]


def describe(d: dict) -> list[str]:
    """Lines for people: the divergence and the cache counters of both runs."""
    e, a = d["exact"], d["approx"]
    lines = [
        f"top-1 agreement {100 * d['top1_agreement']:.1f}%, mean KL(exact||approx) {d['mean_kl']:.4f} nats, "
        f"loss {d['loss_exact']:.4f} -> {d['loss_approx']:.4f} ({100 * d['loss_change']:+.2f}%) "
        f"over {d['positions']} positions"
    ]
    if "cache_misses" in e:
        saved = 1 - a["cache_misses"] / e["cache_misses"] if e["cache_misses"] else 0.0
        lines.append(
            f"decode misses {e['cache_misses']} -> {a['cache_misses']} ({-100 * saved:+.1f}%), "
            f"hits {e['cache_hits']} -> {a['cache_hits']}, read {e['bytes_read'] / 1e6:.1f} MB -> "
            f"{a['bytes_read'] / 1e6:.1f} MB"
        )
    return lines
