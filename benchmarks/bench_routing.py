"""Routing statistics of the trained demo model against a random-weight model of the same shape.

    python benchmarks/bench_routing.py                      # the shipped demo (streamer/assets/demo)
    python benchmarks/bench_routing.py --model DIR --windows 32 --seq-len 256

On held-out stdlib files (never trained on), per MoE layer:
- expert-usage entropy in bits (log2(E) = every expert equally used);
- token-to-token reuse: the fraction of a token's top-k experts that the previous token also used
  (K / E = no better than chance) — what an expert cache lives on.
Also the held-out loss (nats/token) of the trained model, its untrained initialisation and the
held-out text's own unigram entropy. Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))
from common import append_results, row  # noqa: E402


def measure(model_dir: Path, n_windows: int, seq_len: int) -> tuple[dict, dict, dict]:
    from demo_eval import held_out_windows, init_model_for, routing_stats, unigram_entropy
    from demo_training import mean_loss

    from streamer.models.load import load_model
    from streamer.synthetic.presets import Preset
    from streamer.synthetic.writer import generate

    info = json.loads((model_dir / "training.json").read_text())
    windows = held_out_windows(
        model_dir / "tokenizer.json", n_windows, seq_len, info["train_config"]["held_out_every"]
    )
    trained, _ = load_model(model_dir, dtype="float32")
    config = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        preset = Preset("random-like-demo", "random weights, the demo's shape", config["text_config"])
        ckpt = generate(Path(tmp) / "random", preset, dtype="bfloat16", seed=0, tokenizer_dir=model_dir)
        random_model, _ = load_model(ckpt, dtype="float32")
        stats = {
            "demo-trained": routing_stats(trained, windows),
            "random-same-shape": routing_stats(random_model, windows),
        }
    losses = {
        "trained": mean_loss(trained, windows),
        "untrained": mean_loss(init_model_for(model_dir), windows),
        "unigram": unigram_entropy(windows[:, 1:]),
    }
    return stats, losses, {"tokens": int(windows[:, 1:].size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "streamer" / "assets" / "demo")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()

    stats, losses, meta = measure(args.model, args.windows, args.seq_len)
    rows = []
    for name, s in stats.items():
        per_layer_h = " ".join(f"{h:.2f}" for h in s["entropy_bits"])
        per_layer_r = " ".join(f"{r:.3f}" for r in s["reuse"])
        rows.append(
            row(
                name,
                "routing_entropy_bits",
                s["mean_entropy_bits"],
                s["mean_entropy_bits"] / s["uniform_entropy_bits"],
                f"ratio = / log2(E) = {s['uniform_entropy_bits']:.2f}; per layer: {per_layer_h}; {meta['tokens']} held-out tokens",
            )
        )
        rows.append(
            row(
                name,
                "routing_reuse_prev_token",
                s["mean_reuse"],
                s["mean_reuse"] / s["independent_reuse"],
                f"ratio = / (K/E = {s['independent_reuse']:.3f}); per layer: {per_layer_r}",
            )
        )
        print(
            f"{name:18s} entropy {s['mean_entropy_bits']:.3f} bits (uniform {s['uniform_entropy_bits']:.2f}; per layer {per_layer_h})"
        )
        print(
            f"{'':18s} reuse   {s['mean_reuse']:.3f} (chance {s['independent_reuse']:.3f}; per layer {per_layer_r})"
        )
    for name, nats in losses.items():
        rows.append(
            row(
                f"demo-{name}",
                "held_out_loss_nats",
                nats,
                "",
                f"perplexity {math.exp(nats):.1f}; {meta['tokens']} held-out tokens",
            )
        )
        print(f"held-out loss {name:10s} {nats:.3f} nats/token (perplexity {math.exp(nats):.1f})")
    append_results(rows)


if __name__ == "__main__":
    main()
