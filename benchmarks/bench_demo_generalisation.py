"""How well demo models generalise: held-out loss on Python they never saw, against unigram baselines.

    python benchmarks/bench_demo_generalisation.py                       # the shipped demo
    python benchmarks/bench_demo_generalisation.py --rev old=HEAD~1 --model new=scratch/run/export

Two held-out sets, each scored by every model in the same run:
- ``repo``: this repository's own tracked .py files (streamer/, tools/, tests/, benchmarks/), which no
  demo corpus reads;
- ``stdlib``: the standard-library files that ``tools/demo_corpus.py`` holds out (one in 32 by path hash).

Per model and set: mean next-token loss (nats/token) over evenly spaced windows; the unigram entropy of
those same target tokens (the best any unigram model does on them, even one fitted to the very text); their
ratio (lower is better; the issue's metric); and nats per byte (loss x tokens / bytes of the whole set),
which compares models with different tokenizers. Appends one row per model and set to results.tsv, the
ratio column holding loss / unigram, and one row per extra model with its nats/byte over the first one's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))
from common import append_results, load_note, row  # noqa: E402

DEMO = "streamer/assets/demo"
REPO_DIRS = ("streamer/", "tools/", "tests/", "benchmarks/")


def repo_sources() -> list[str]:
    """This repository's tracked .py files (the committed set, whatever is in progress in the tree)."""
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    names = [n for n in out.stdout.split() if n.startswith(REPO_DIRS)]
    return [(ROOT / n).read_text(encoding="utf-8") for n in names if (ROOT / n).is_file()]


def stdlib_held_out() -> list[str]:
    from demo_corpus import read_corpus

    return read_corpus(held_out_every=32, splits=("held_out",)).held_out


def checkout_demo(rev: str, dst: Path) -> Path:
    """The demo checkpoint as committed at ``rev``, written to ``dst``."""
    out = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:{DEMO}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    dst.mkdir(parents=True)
    for name in out.stdout.split():
        blob = subprocess.run(
            ["git", "show", f"{rev}:{DEMO}/{name}"], cwd=ROOT, capture_output=True, check=True
        )
        (dst / name).write_bytes(blob.stdout)
    return dst


def score(model_dir: Path, docs: list[str], n_windows: int, seq_len: int) -> dict:
    """Loss, unigram entropy, their ratio and nats/byte of one model on one document set."""
    from demo_corpus import encode_documents
    from demo_eval import unigram_entropy
    from demo_training import eval_windows, mean_loss
    from tokenizers import Tokenizer

    from streamer.models.load import load_model

    tokens = encode_documents(Tokenizer.from_file(str(model_dir / "tokenizer.json")), docs)
    windows = eval_windows(tokens, n_windows, seq_len)
    model, _ = load_model(model_dir, dtype="float32")
    loss = mean_loss(model, windows)
    unigram = unigram_entropy(windows[:, 1:])
    n_bytes = sum(len(d.encode()) + 1 for d in docs)  # + 1: the separator, about one byte of text
    return {
        "loss": loss,
        "unigram": unigram,
        "ratio": loss / unigram,
        "nats_per_byte": loss * len(tokens) / n_bytes,
        "bytes_per_token": n_bytes / len(tokens),
        "tokens": int(windows[:, 1:].size),
    }


def describe(model_dir: Path) -> str:
    info = json.loads((model_dir / "training.json").read_text())
    cfg = info["train_config"]
    text = f"{cfg.get('corpus', 'stdlib')}, {info['steps']} steps of {cfg['batch_size']}x{cfg['seq_len']}"
    if continued := info.get("continued"):  # tools/train_demo.py --continue-from
        text += f" (a {continued['from_steps']}-step run continued with a {continued['rewarm_steps']}-step re-warm)"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR", help="a checkpoint directory")
    p.add_argument("--rev", action="append", default=[], metavar="LABEL=REV", help=f"{DEMO} at a git rev")
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--no-append", action="store_true", help="print only")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for spec in a.rev:
            label, rev = spec.split("=", 1)
            models[label] = checkout_demo(rev, Path(tmp) / label)
        for spec in a.model:
            label, path = spec.split("=", 1)
            models[label] = Path(path)
        models = models or {"shipped": ROOT / DEMO}
        sets = {"repo": repo_sources(), "stdlib": stdlib_held_out()}
        results = {
            (m, s): score(d, docs, a.windows, a.seq_len)
            for m, d in models.items()
            for s, docs in sets.items()
        }
        labels = {m: describe(d) for m, d in models.items()}
    note_load = load_note()
    rows = []
    print(f"{'model':<12}{'set':<8}{'loss':>8}{'unigram':>9}{'ratio':>8}{'nats/B':>9}{'B/tok':>7}")
    first = next(iter(models))
    for (m, s), r in results.items():
        print(
            f"{m:<12}{s:<8}{r['loss']:8.3f}{r['unigram']:9.3f}{r['ratio']:8.3f}"
            f"{r['nats_per_byte']:9.3f}{r['bytes_per_token']:7.2f}"
        )
        config = f"demo {m}: {labels[m]}"
        note = (
            f"unigram entropy of the same targets {r['unigram']:.3f}; {r['nats_per_byte']:.4f} nats/byte "
            f"({r['bytes_per_token']:.2f} bytes/token); {r['tokens']} tokens; {note_load}"
        )
        rows.append(
            row(config, f"held-out loss on {s} (nats/token), ratio = / unigram", r["loss"], r["ratio"], note)
        )
        if m != first:
            ratio = r["nats_per_byte"] / results[first, s]["nats_per_byte"]
            rows.append(
                row(
                    config,
                    f"held-out nats/byte on {s}, ratio = / {first}'s",
                    r["nats_per_byte"],
                    ratio,
                    note_load,
                )
            )
    if not a.no_append:
        append_results(rows)


if __name__ == "__main__":
    main()
