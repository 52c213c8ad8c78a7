"""``streamer advise``: hit rate and expected decode speed per cache size, from a routing trace.

The trace (recorded on the user's machine with ``--trace``) is replayed through ``cache_sim`` at several
budgets, with every ``--cache-policy`` and the optimal policy; each row reports the best policy's misses and
``recommend_policy`` names the policy to use. With the packed model, a budget is split into slot pools
exactly as the runtime splits it (``plan_slots`` over the manifest's block shapes) and every decode miss
costs its layer's block bytes.
Expected time per decode token, from the simulated misses:

    serial      = compute + missed bytes / read bandwidth    (reads wait for compute; the usual case)
    overlapped  = max(compute, missed bytes / read bandwidth) (reads fully hidden, an upper bound)

Hit rates count decode steps only; the prompt's steps still warm the simulated cache first, as they do
the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from streamer.errors import ConfigError
from streamer.experts.expert_cache import plan_slots
from streamer.experts.policy import DEFAULT_POLICY, POLICIES
from streamer.experts.runtime import block_shape_of
from streamer.models.args import ModelArgs
from streamer.storage.packed_format import Manifest
from streamer.tuning.cache_sim import (
    Step,
    TraceError,
    decode_tokens,
    distinct_experts,
    simulate,
    simulate_optimal,
)

# Default budgets as shares of all expert bytes (the smallest workable budget is added in front).
DEFAULT_SHARES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class AdviceRow:
    """One cache size: its simulated decode hit rate and what that costs per token."""

    cache_bytes: int | None  # None when the model is not known (sizes are then slot counts)
    slots: int
    share: float  # of all experts (with a model) or of the experts the trace touches (without)
    hit_rate: float  # of ``policy``, the best policy at this size
    optimal_hit_rate: float
    policy: str = DEFAULT_POLICY
    policy_hit_rates: dict = field(default_factory=dict)  # every --cache-policy -> decode hit rate
    missed_mb_per_token: float | None = None
    serial_tps: float | None = None
    overlapped_tps: float | None = None


def check_trace_fits(steps: Sequence[Step], manifest: Manifest) -> None:
    """Raises TraceError when the trace names layers or experts the model does not have."""
    layers = manifest.layers
    for s in steps:
        if s.layer >= len(layers) or s.experts[-1] >= layers[s.layer].num_experts:
            raise TraceError(
                f"the trace routes to layer {s.layer} expert {s.experts[-1]}, which this model "
                f"({len(layers)} layers) does not have: was it recorded with another model?"
            )
    if decode_tokens(steps) == 0:
        raise TraceError("the trace has no decode steps (one token per step): record it with -n 2 or more")


def advise_model(
    steps: Sequence[Step],
    manifest: Manifest,
    args: ModelArgs,
    budgets: Sequence[int] | None = None,
    compute_ms: float | None = None,
    read_gbps: float | None = None,
) -> list[AdviceRow]:
    """One AdviceRow per budget (bytes), with pools split as the runtime splits them.

    Raises:
        ConfigError: a budget below the smallest workable one (one layer's top-k per pool).
        TraceError: the trace does not fit the model.
    """
    check_trace_fits(steps, manifest)
    layers = manifest.layers
    shapes = {e.layer: block_shape_of(e) for e in layers}
    counts = {e.layer: e.num_experts for e in layers}
    total_experts = sum(counts.values())
    if budgets is None:
        budgets = default_budgets(manifest, args.num_experts_per_tok)
    n_tokens = decode_tokens(steps)
    rows = []
    for budget in budgets:
        plan = plan_slots(shapes, counts, budget, args.num_experts_per_tok)
        results = {p: simulate(steps, plan, pool_of_layer=shapes, policy=p) for p in POLICIES}
        best = _best(results)
        opt = simulate_optimal(steps, plan, pool_of_layer=shapes)
        missed = sum(n * layers[l].block_bytes for l, n in results[best].misses_by_layer.items()) / n_tokens
        row = AdviceRow(
            cache_bytes=sum(s.nbytes * n for s, n in plan.items()),
            slots=sum(plan.values()),
            share=sum(plan.values()) / total_experts,
            hit_rate=results[best].decode_hit_rate,
            optimal_hit_rate=opt.decode_hit_rate,
            policy=best,
            policy_hit_rates={p: r.decode_hit_rate for p, r in results.items()},
            missed_mb_per_token=missed / 1e6,
        )
        if read_gbps:
            io_s = missed / (read_gbps * 1e9)
            compute_s = (compute_ms or 0.0) / 1000
            row.serial_tps = 1 / max(compute_s + io_s, 1e-9)
            row.overlapped_tps = 1 / max(compute_s, io_s, 1e-9)
        rows.append(row)
    return rows


def default_budgets(manifest: Manifest, top_k: int) -> list[int]:
    """The smallest workable budget, then DEFAULT_SHARES of all expert bytes above it."""
    sizes = {block_shape_of(e).nbytes for e in manifest.layers}
    smallest = top_k * sum(sizes)
    total = sum(block_shape_of(e).nbytes * e.num_experts for e in manifest.layers)
    return [smallest] + [int(total * s) for s in DEFAULT_SHARES if total * s > smallest]


def advise_slots(steps: Sequence[Step], slot_counts: Sequence[int] | None = None) -> list[AdviceRow]:
    """Without the model: one pool of ``slot_counts`` experts (default: shares of the experts seen)."""
    seen = distinct_experts(steps)
    if decode_tokens(steps) == 0:
        raise TraceError("the trace has no decode steps (one token per step): record it with -n 2 or more")
    widest = max(len(s.experts) for s in steps if s.is_decode)
    if slot_counts is None:
        slot_counts = sorted({max(widest, round(seen * s)) for s in DEFAULT_SHARES})
    rows = []
    for n in slot_counts:
        if n < widest:
            raise ConfigError(f"{n} slots cannot hold one decode step's {widest} experts")
        results = {p: simulate(steps, n, policy=p) for p in POLICIES}
        best = _best(results)
        rates = {p: r.decode_hit_rate for p, r in results.items()}
        opt = simulate_optimal(steps, n).decode_hit_rate
        rows.append(AdviceRow(None, n, n / seen, rates[best], opt, best, rates))
    return rows


def _best(results: dict) -> str:
    """The policy with the most decode hits; the default wins ties."""
    return max(results, key=lambda p: (results[p].decode_hits, p == DEFAULT_POLICY))


def recommend_policy(rows: Sequence[AdviceRow]) -> str:
    """The ``--cache-policy`` with the most hits summed over the sizes tried (the default on a tie)."""
    totals = {p: sum(r.policy_hit_rates.get(p, 0.0) for r in rows) for p in POLICIES}
    return max(totals, key=lambda p: (round(totals[p], 9), p == DEFAULT_POLICY))
