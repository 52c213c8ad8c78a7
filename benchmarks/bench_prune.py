"""`streamer prune`: held-out loss change of REAP vs frequency vs random pruning, hit rate, mlx-lm parity.

    python benchmarks/bench_prune.py                                  # the demo model
    python benchmarks/bench_prune.py --models demo,routing-study --study scratch/routing-study/packed

Per model: one REAP profile (``profile_texts --reap``) over Python standard library sources (what the
demo models were trained on: the "user's work"); held-out text = this repository's streamer/ sources,
which neither the models nor the profile saw (``held_out_ids``: a 32-token prompt, then every following
token fed teacher-forced as a decode step). At 12.5 / 25 / 50 % of each layer's experts removed, each
method prunes the model (``make_prune_plan`` / ``run_prune``, exactly what the command runs) and the
pruned model is compared with the unpruned one (``divergence.compare``): loss change (pruned / unpruned
- 1) and top-1 agreement. Random is the mean of three seeds. Decode hit rate: the runtime's own counters
over the same decode steps, with the same fixed cache (30 % of the *unpruned* model's experts) for the
unpruned and each REAP-pruned model, cold. mlx-lm: the REAP 25 % model exported with
``--export-checkpoint``'s code, greedy tokens of mlx-lm vs the engine (float32), share equal.
Goal (issue 19): REAP <= frequency at every ratio, REAP <= half of random's loss increase at 25 %.
Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mlx.core as mx  # noqa: E402
from bench_trained_routing import STUDY, held_out_ids, packed_model  # noqa: E402
from common import append_results, row  # noqa: E402

from streamer.generation.generate import prefill  # noqa: E402
from streamer.loader import load_engine  # noqa: E402
from streamer.settings import RuntimeConfig  # noqa: E402
from streamer.storage.export import export_checkpoint  # noqa: E402
from streamer.storage.packed import open_packed  # noqa: E402
from streamer.storage.prune import make_prune_plan, run_prune  # noqa: E402
from streamer.tuning.divergence import compare, teacher_forced  # noqa: E402
from streamer.tuning.profile import profile_texts  # noqa: E402
from streamer.tuning.saliency import choose_experts, keep_count  # noqa: E402

RATIOS = (0.125, 0.25, 0.5)
SEEDS = (0, 1, 2)
STDLIB = Path(os.__file__).parent
PROFILE_TEXTS = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:8]
WORK = Path("/tmp/streamer-bench-prune")  # one subdirectory per model
CACHE_SHARE = 0.3


def run(engine_path: Path, ids: list[int], cache_experts: int, n_prompt: int):
    config = RuntimeConfig(dtype="float32", cache_experts=cache_experts)
    with load_engine(engine_path, config) as engine:
        return teacher_forced(engine, ids, n_prompt)


def hit_rate(counters: dict) -> float:
    return counters["cache_hits"] / max(counters["cache_hits"] + counters["cache_misses"], 1)


def greedy_agreement(pruned: Path, out: Path, ids: list[int], n: int) -> float:
    import mlx_lm
    from mlx_lm.generate import generate_step

    shutil.rmtree(out, ignore_errors=True)
    export_checkpoint(open_packed(pruned), out)
    model, _ = mlx_lm.load(str(out))
    want = [
        int(t)
        for t, _ in generate_step(
            mx.array(ids), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
        )
    ]
    with load_engine(pruned, RuntimeConfig(dtype="float32")) as engine:
        cache = engine.model.make_cache()
        logits, got = prefill(engine.model, ids, cache), []
        for _ in range(n):
            got.append(int(mx.argmax(logits.reshape(-1))))
            logits = engine.model(mx.array([[got[-1]]]), cache=cache)[0, -1]
    return sum(a == b for a, b in zip(got, want, strict=True)) / n


def bench_model(name: str, packed: Path, n_tokens: int, profile_tokens: int, model_note: str = "") -> list:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = open_packed(packed)
    num_experts = [e.num_experts for e in source.manifest.layers]
    cache = round(CACHE_SHARE * sum(num_experts))
    with load_engine(packed, RuntimeConfig(dtype="float32")) as engine:
        top_k = engine.args.num_experts_per_tok
        profile = profile_texts(engine, PROFILE_TEXTS, max_tokens=profile_tokens, reap=True)
        ids = held_out_ids(engine.tokenizer, n_tokens)
    n_prompt = 32
    base = run(packed, ids, cache, n_prompt)
    config = f"{name}{model_note}: {len(num_experts)}L x {num_experts[0]} experts top-{top_k}, f32"
    note = (
        f"profile {profile.tokens} tokens of stdlib json+email (--reap); held-out {n_tokens - n_prompt} "
        f"teacher-forced decode positions of streamer/ sources; loss unpruned {compare(base, base)['loss_exact']:.4f}"
    )
    rows, changes = [], {}
    base_hit = hit_rate(base.counters)
    for ratio in RATIOS:
        keep = keep_count(num_experts[0], top_k, None, ratio)
        for method in ("reap", "frequency", "random"):
            results = []
            for seed in SEEDS if method == "random" else (0,):
                kept = choose_experts(profile, num_experts, keep, method, seed)
                dst = work / f"{method}-{ratio}-{seed}"
                run_prune(make_prune_plan(source, dst, kept, {"method": method}))
                pruned = run(dst, ids, cache, n_prompt)
                results.append((compare(base, pruned), pruned, dst))
            loss = sum(r[0]["loss_change"] for r in results) / len(results)
            top1 = sum(r[0]["top1_agreement"] for r in results) / len(results)
            changes[method, ratio] = loss
            print(
                f"{name} {ratio:.3f} {method:9s} loss {100 * loss:+.2f}%  top-1 {100 * top1:.1f}%", flush=True
            )
            seeds = f" (mean of seeds {SEEDS})" if method == "random" else ""
            rows.append(
                row(
                    config,
                    f"prune {100 * ratio:g}% of experts by {method}: held-out loss change{seeds}",
                    round(loss, 5),
                    "",
                    f"keep {keep}/{num_experts[0]}; top-1 agreement {top1:.3f}; {note}",
                )
            )
            if method == "reap":
                hit = hit_rate(results[0][1].counters)
                rows.append(
                    row(
                        config,
                        f"decode hit rate, cache {cache} experts (30% of unpruned): REAP {100 * ratio:g}% pruned",
                        round(hit, 4),
                        round(hit / base_hit, 3),
                        f"unpruned {base_hit:.4f} at the same cache (ratio = pruned / unpruned); cold start",
                    )
                )
            if method == "reap" and ratio == 0.25:
                agree = greedy_agreement(results[0][2], work / "export", ids[:24], 32)
                rows.append(
                    row(
                        config,
                        "REAP 25% exported checkpoint: mlx-lm greedy tokens = engine's (share)",
                        agree,
                        "",
                        "32 greedy tokens after a 24-token held-out prompt, float32, mlx_lm.load on the export",
                    )
                )
    for i, r in enumerate(rows):  # ratio column of the loss rows: method / random at the same ratio
        for ratio in RATIOS:
            for method in ("reap", "frequency"):
                if r[4].startswith(f"prune {100 * ratio:g}% of experts by {method}:"):
                    random = changes["random", ratio]
                    rows[i][6] = f"{changes[method, ratio] / random:.3f}" if random else ""
    goal_freq = all(changes["reap", r] <= changes["frequency", r] for r in RATIOS)
    goal_random = changes["reap", 0.25] <= 0.5 * changes["random", 0.25]
    print(
        f"{name}: REAP <= frequency at every ratio: {goal_freq}; REAP <= half of random at 25%: {goal_random}"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo")
    ap.add_argument("--study", type=Path, default=STUDY, help="the packed routing-study model")
    ap.add_argument("--tokens", type=int, default=288, help="held-out tokens (32 of them the prompt)")
    ap.add_argument("--profile-tokens", type=int, default=8000)
    ap.add_argument("--model-note", default="", help="appended to the model's name in results.tsv")
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to results.tsv")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(
            name, packed_model(name, args.study), args.tokens, args.profile_tokens, args.model_note
        )
    if not args.no_results:
        append_results(rows)


if __name__ == "__main__":
    main()
