"""How good is the demo model: held-out loss against baselines, and how it routes.

- ``unigram_loss``: a unigram model fitted on the training stream (add-one smoothing), and
  ``unigram_entropy``: the held-out text's own unigram entropy, the best any unigram model can do on it.
- ``routing_stats``: per MoE layer, the entropy of expert usage (log2(E) bits = uniform) and the
  token-to-token reuse (fraction of a token's top-k experts that the previous token also used; K / E when
  routing is independent of the previous token). Both decide how well an expert cache works.

Works on any model built from ``streamer.models.qwen3_5_moe`` (the training model or a loaded, quantized
checkpoint): the router is observed by wrapping each MoE block's ``gate``.

Names: N = windows, L = tokens per window, E = experts, K = experts per token.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from demo_corpus import encode_documents, read_corpus
from demo_training import (
    RouterRecord,
    TrainConfig,
    eval_windows,
    load_tokens,
    make_model,
    mean_loss,
    n_tokens,
    vocab_size_for,
)

from streamer.models.qwen3_5_moe import Model


def unigram_loss(train_tokens: np.ndarray, targets: np.ndarray, n_vocab: int) -> float:
    """Cross-entropy (nats) of ``targets`` under token frequencies of ``train_tokens`` (add-one smoothed)."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=n_vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets.astype(np.int64).ravel()].mean())


def unigram_entropy(targets: np.ndarray) -> float:
    """Entropy (nats) of the targets' own token frequencies: no unigram model does better on them."""
    counts = np.bincount(targets.astype(np.int64).ravel()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class GateRecorder(nn.Module):
    """Wraps a MoE block's router: returns its logits unchanged and records (probs, top-k indices)."""

    def __init__(self, gate: nn.Module, top_k: int, record: RouterRecord):
        super().__init__()
        self.inner = gate
        self.top_k = top_k
        self.record = record

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.inner(x)
        probs = mx.softmax(logits, axis=-1, precise=True)  # as SparseMoeBlock: same top-k
        indices = mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :]
        self.record.layers.append((probs, indices))
        return logits


@contextlib.contextmanager
def recording_router(model: Model) -> Iterator[RouterRecord]:
    """Within the block, every forward pass appends each layer's (probs, indices) to the record."""
    record = RouterRecord()
    blocks = [layer.mlp for layer in model.layers]
    originals = [b.gate for b in blocks]
    for b in blocks:
        b.gate = GateRecorder(b.gate, b.top_k, record)
    try:
        yield record
    finally:
        for b, gate in zip(blocks, originals, strict=True):
            b.gate = gate


def routing_indices(model: Model, windows: np.ndarray, batch_size: int = 8) -> list[np.ndarray]:
    """The experts each token chose, per layer: [N, L, K] for windows [N, L]."""
    per_layer: list[list[np.ndarray]] = [[] for _ in model.layers]
    with recording_router(model) as record:
        for i in range(0, len(windows), batch_size):
            record.layers.clear()
            mx.eval(model(mx.array(windows[i : i + batch_size].astype(np.int32))))
            for layer, (_, indices) in enumerate(record.layers):
                per_layer[layer].append(np.array(indices))
    return [np.concatenate(chunks) for chunks in per_layer]


def routing_stats(model: Model, windows: np.ndarray) -> dict:
    """Per-layer expert-usage entropy (bits) and token-to-token reuse, with their random-routing values."""
    E, K = model.args.num_experts, model.args.num_experts_per_tok
    entropy, reuse = [], []
    for idx in routing_indices(model, windows):  # [N, L, K]
        counts = np.bincount(idx.ravel(), minlength=E).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropy.append(float(-(p * np.log2(p)).sum()))
        prev, cur = idx[:, :-1, :, None], idx[:, 1:, None, :]  # [N, L - 1, K, 1] vs [N, L - 1, 1, K]
        shared = (prev == cur).any(axis=-2).sum(axis=-1)  # experts of token t also used by t - 1
        reuse.append(float(shared.mean() / K))
    return {
        "entropy_bits": entropy,
        "reuse": reuse,
        "mean_entropy_bits": float(np.mean(entropy)),
        "mean_reuse": float(np.mean(reuse)),
        "uniform_entropy_bits": math.log2(E),
        "independent_reuse": K / E,
    }


def held_out_windows(tokenizer_file: Path, n: int, seq_len: int, held_out_every: int = 32) -> np.ndarray:
    """``n`` windows [n, seq_len + 1] of this machine's held-out stdlib files, encoded with a checkpoint's
    tokenizer (files held out by path, so none of them was trained on whatever Python trained the model)."""
    from tokenizers import Tokenizer

    corpus = read_corpus(held_out_every=held_out_every, splits=("held_out",))
    tokens = encode_documents(Tokenizer.from_file(str(tokenizer_file)), corpus.held_out)
    return eval_windows(tokens, n, seq_len)


def init_model_for(ckpt: Path) -> Model:
    """The untrained initialisation of the model a checkpoint was trained from (its training.json)."""
    info = json.loads((Path(ckpt) / "training.json").read_text())
    cfg = TrainConfig(**info["train_config"])
    vocab = json.loads((Path(ckpt) / "config.json").read_text())["text_config"]["vocab_size"]
    model, _ = make_model(cfg, vocab)
    return model


def evaluate_export(run_dir: Path, ckpt: Path, n_windows: int = 32, seq_len: int = 256) -> dict:
    """Held-out loss of the exported checkpoint vs the float weights, the initialisation and unigrams."""
    from streamer.models.load import load_model

    run_dir = Path(run_dir)
    cfg = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    train_tokens, held_tokens = load_tokens(run_dir)
    windows = eval_windows(held_tokens, n_windows, seq_len)
    exported, _ = load_model(ckpt, dtype="float32")
    trained, _ = make_model(cfg, vocab_size_for(n_tokens(run_dir)))
    trained.load_weights(str(run_dir / "checkpoint" / "model.safetensors"))
    untrained, _ = make_model(cfg, vocab_size_for(n_tokens(run_dir)))
    losses = {
        "exported": mean_loss(exported, windows),
        "trained_float32": mean_loss(trained, windows),
        "untrained": mean_loss(untrained, windows),
        "unigram_train_fit": unigram_loss(train_tokens, windows[:, 1:], n_tokens(run_dir)),
        "unigram_held_out_entropy": unigram_entropy(windows[:, 1:]),
    }
    return {
        "held_out_tokens": int(windows[:, 1:].size),
        "held_out_loss_nats": losses,
        "held_out_perplexity": {k: math.exp(v) for k, v in losses.items()},
        "routing": routing_stats(exported, windows[:8]),
    }
