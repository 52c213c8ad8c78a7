#!/usr/bin/env python3
"""Trains the embedded demo model and exports it as an mlx-community checkpoint (maintainer script).

    python tools/train_demo.py                                  # train (or resume) in the default run dir
    python tools/train_demo.py --export streamer/assets/demo    # ... then write the shipped checkpoint
    python tools/train_demo.py --steps 20 --layers 2 --max-corpus-chars 200000 --out /tmp/tiny
    python tools/train_demo.py --preset routing-study --out scratch/routing-study \
        --export scratch/routing-study/checkpoint-export    # 256 experts top-10, ~30 min on 2 cores

    python tools/train_demo.py --preset demo-mix --steps 1200 --out scratch/demo-mix1200 \
        --continue-from scratch/demo-mix550                       # 550 steps more on a finished run

``--preset`` picks a named geometry (``demo_training.PRESETS``: ``demo``, the default, the stdlib-only
model shipped before; ``demo-mix`` the same on a wider corpus, the shipped weights: 550 steps, continued to
1,200 and then 1,700 with ``--continue-from``, see README "The demo model"; ``routing-study`` has the 397B's
routing shape in miniature); the other flags override its fields.

A Qwen3.5-MoE (the project's own model classes, float32, chunked DeltaNet) learns Python source already on
the machine (``--corpus``: ``stdlib``, the default and the shipped demo's, or ``stdlib+site-packages``, the
installed packages too, as ``--preset demo-mix``): see tools/demo_corpus.py for the corpus and tokenizer,
tools/demo_training.py for the model, loop, checkpoints and export. Interrupt at any time (Ctrl-C): the run
checkpoints and the same command resumes it, taking exactly the steps an uninterrupted run would. The loss
curve is in <out>/loss.tsv.

``--continue-from RUN`` trains a finished run further, to ``--steps`` in all, in a new ``--out`` (the
run's tokens, tokenizer and last checkpoint are copied there; it resumes like any run). Its learning rate
cannot be the one an uninterrupted run of ``--steps`` would have had (RUN's cosine already decayed to its
floor), so it re-warms linearly over ``--rewarm-steps`` from RUN's last rate to the ``--steps``-long run's
rate at that point, then follows that run's schedule to the end: the last steps match the longer run's, the
first ones decayed faster. ``continued.json`` in the run (and ``training.json`` in an export) says so.

MLX's Linux CPU wheel ships the reference BLAS; when Debian's OpenBLAS is installed
(``apt-get install libopenblas0-pthread``) the script re-executes itself with it preloaded, which makes
float32 matmuls ~30x faster. ``--no-openblas`` (or a missing library) trains without it, slowly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
REEXEC_ENV = "STREAMER_TRAIN_DEMO_REEXEC"


def maybe_reexec_with_openblas(enabled: bool) -> None:
    """Restarts this process with OpenBLAS in LD_PRELOAD (once) when it exists and is not loaded yet."""
    if not enabled or not sys.platform.startswith("linux") or os.environ.get(REEXEC_ENV):
        return
    if not OPENBLAS.exists() or str(OPENBLAS) in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in [str(OPENBLAS), env.get("LD_PRELOAD", "")] if p)
    env[REEXEC_ENV] = "1"
    # One BLAS thread: MLX's CPU ops run beside it on the same 2 cores (measured 830 vs 690 tok/s).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def default_run_dir() -> Path:
    from streamer.synthetic.demo import cache_dir

    return cache_dir() / "train-demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from demo_training import PRESETS, TrainConfig

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    preset = first.parse_known_args(argv)[0].preset
    d = TrainConfig(**PRESETS[preset])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="named geometry (other flags override it)"
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: <cache>/train-demo)")
    p.add_argument("--export", type=Path, default=None, help="after training, write the checkpoint here")
    p.add_argument("--export-only", action="store_true", help="skip training; export the last checkpoint")
    p.add_argument("--no-openblas", action="store_true", help="do not preload Debian's OpenBLAS")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--corpus", default=d.corpus, help="corpus sources joined by '+': stdlib, site-packages")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--hidden", type=int, default=d.hidden_size)
    p.add_argument("--experts", type=int, default=d.num_experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--expert-inter", type=int, default=d.moe_intermediate_size)
    p.add_argument("--shared-inter", type=int, default=None, help="default: 2 x --expert-inter")
    p.add_argument("--vocab-tokens", type=int, default=d.vocab_tokens)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--aux-coef", type=float, default=d.aux_loss_coef)
    p.add_argument("--max-corpus-chars", type=int, default=None, help="a slice of the corpus (tests)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-compile", action="store_true", help="run the step eagerly (no mx.compile)")
    p.add_argument("--continue-from", type=Path, default=None, help="a finished run to train further")
    p.add_argument("--rewarm-steps", type=int, default=50, help="with --continue-from: the re-warm")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace):
    from demo_training import TrainConfig

    return TrainConfig(
        seed=a.seed,
        corpus=a.corpus,
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_experts=a.experts,
        top_k=a.top_k,
        moe_intermediate_size=a.expert_inter,
        shared_intermediate_size=a.shared_inter or 2 * a.expert_inter,
        vocab_tokens=a.vocab_tokens,
        max_corpus_chars=a.max_corpus_chars,
        steps=a.steps,
        batch_size=a.batch,
        seq_len=a.seq_len,
        learning_rate=a.lr,
        aux_loss_coef=a.aux_coef,
        log_every=a.log_every,
        eval_every=a.eval_every,
        checkpoint_every=a.checkpoint_every,
        compile=not a.no_compile,
    )


def print_progress(cfg, start: list[float]):
    def progress(row: dict) -> None:
        step = row["step"]
        if step % cfg.log_every and row["held_out_ce"] is None and step != cfg.steps:
            return
        now = time.perf_counter()
        if start[1] == 0:
            start[:] = [now, step]
        rate = (step - start[1]) / (now - start[0]) if now > start[0] else 0.0
        eta = (cfg.steps - step) / rate / 60 if rate else float("nan")
        held = f"  held-out {row['held_out_ce']:.3f}" if row["held_out_ce"] is not None else ""
        print(
            f"step {step:5d}/{cfg.steps}  loss {row['loss']:.3f} (ce {row['ce']:.3f}, aux {row['aux']:.3f})"
            f"  lr {row['lr']:.2e}  {row['tokens'] / row['elapsed_s']:.0f} tok/s  eta {eta:.1f} min{held}",
            flush=True,
        )

    return progress


CONTINUED = "continued.json"


def start_continuation(source: Path, run_dir: Path, cfg, rewarm_steps: int) -> None:
    """Seeds ``run_dir`` with finished run ``source``'s data and last checkpoint, to go on to ``cfg.steps``.

    Raises:
        ValueError: ``source`` is unfinished, has another config (other than steps and bookkeeping), or
            already has ``cfg.steps``; ``run_dir`` holds another run.
    """
    import dataclasses
    import shutil

    from demo_training import RESUMABLE_FIELDS

    if (run_dir / CONTINUED).exists():
        info = json.loads((run_dir / CONTINUED).read_text())
        if Path(info["from"]).resolve() != source.resolve() or info["rewarm_steps"] != rewarm_steps:
            raise ValueError(f"{run_dir} continues {info['from']} with other options: {info}")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} is not empty; --continue-from starts a new run directory")
    saved = json.loads((source / "train_config.json").read_text())
    ours = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
    diff = {k: d for k, d in diff.items() if k not in (*RESUMABLE_FIELDS, "steps")}
    if diff:
        raise ValueError(f"{source} was trained with another config (saved, given): {diff}")
    state = json.loads((source / "checkpoint" / "state.json").read_text())
    if state["step"] != saved["steps"]:
        raise ValueError(f"{source} stopped at step {state['step']} of {saved['steps']}: resume it instead")
    if cfg.steps <= saved["steps"] + rewarm_steps:
        raise ValueError(f"--steps {cfg.steps} leaves no steps after {saved['steps']} + the re-warm")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "checkpoint"):
        shutil.copytree(source / name, run_dir / name)
    for name in ("tokens.npz", "corpus.json"):
        shutil.copy2(source / name, run_dir / name)
    (run_dir / "train_config.json").write_text(json.dumps(ours, indent=2) + "\n")
    info = {
        "from": str(source),
        "from_steps": saved["steps"],
        "rewarm_steps": rewarm_steps,
        "schedule": (
            f"steps 1-{saved['steps']}: {source}'s (ending at its floor); then a linear re-warm over "
            f"{rewarm_steps} steps to the {cfg.steps}-step run's rate, whose cosine it follows from step "
            f"{saved['steps'] + rewarm_steps} to {cfg.steps}"
        ),
    }
    (run_dir / CONTINUED).write_text(json.dumps(info, indent=2) + "\n")


def continued_schedule(cfg, from_steps: int, rewarm_steps: int):
    """The learning rate of a run continued at ``from_steps`` (see ``start_continuation``), by step."""
    import dataclasses

    import mlx.core as mx
    import mlx.optimizers as optim
    from demo_training import make_optimizer

    # demo_training's own schedules (AdamW keeps its learning-rate schedule among its schedulers).
    first = make_optimizer(dataclasses.replace(cfg, steps=from_steps))._schedulers["learning_rate"]
    full = make_optimizer(cfg)._schedulers["learning_rate"]
    end = from_steps + rewarm_steps
    rewarm = optim.linear_schedule(
        first(mx.array(from_steps)).item(), full(mx.array(end)).item(), rewarm_steps
    )

    def schedule(step):
        return mx.where(
            step < from_steps, first(step), mx.where(step < end, rewarm(step - from_steps), full(step))
        )

    return schedule


@contextlib.contextmanager
def continued_optimizer(run_dir: Path, cfg):
    """While open, ``demo_training.train`` builds its optimizer with the continued schedule when ``run_dir``
    is a continuation; yields its ``continued.json`` (None for an ordinary run, which is left alone)."""
    import demo_training
    import mlx.optimizers as optim

    if not (run_dir / CONTINUED).exists():
        yield None
        return
    info = json.loads((run_dir / CONTINUED).read_text())
    schedule = continued_schedule(cfg, info["from_steps"], info["rewarm_steps"])
    if (earlier := Path(info["from"]) / CONTINUED).exists():  # the source was itself continued
        info = {**info, "from_continued": json.loads(earlier.read_text())}

    def make_optimizer(c):
        return optim.AdamW(schedule, betas=[0.9, 0.95], weight_decay=c.weight_decay)

    original = demo_training.make_optimizer
    demo_training.make_optimizer = make_optimizer
    try:
        yield info
    finally:
        demo_training.make_optimizer = original


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maybe_reexec_with_openblas(not args.no_openblas)
    from demo_training import export_checkpoint, train

    run_dir = args.out or default_run_dir()
    cfg = config_from_args(args)
    blas = "OpenBLAS preloaded" if str(OPENBLAS) in os.environ.get("LD_PRELOAD", "") else "MLX's bundled BLAS"
    print(f"run dir {run_dir} ({blas})", flush=True)
    if args.continue_from:
        start_continuation(args.continue_from, run_dir, cfg, args.rewarm_steps)
    with continued_optimizer(run_dir, cfg) as continued:
        if continued:
            print(f"continuing {continued['from']}: {continued['schedule']}", flush=True)
        if not args.export_only:
            try:
                train(run_dir, cfg, print_progress(cfg, [0.0, 0]))
            except KeyboardInterrupt:
                return 130
            print(f"loss curve: {run_dir / 'loss.tsv'}")
    if args.export:
        from demo_eval import evaluate_export

        export_checkpoint(run_dir, args.export, extra_info={"continued": continued} if continued else None)
        report = evaluate_export(run_dir, args.export)
        info_file = args.export / "training.json"
        info_file.write_text(
            json.dumps({**json.loads(info_file.read_text()), "evaluation": report}, indent=2) + "\n"
        )
        print(f"exported {args.export}: {json.dumps(report, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
