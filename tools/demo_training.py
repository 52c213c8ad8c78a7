"""Training the demo model: the project's own Qwen3.5-MoE in MLX, with a load-balancing router loss.

A run lives in one directory:

    train_config.json   the ``TrainConfig`` (a resumed run must match it)
    tokenizer/          tokenizer.json, tokenizer_config.json, chat_template.jinja
    tokens.npz          the encoded training and held-out streams (uint16)
    checkpoint/         model.safetensors, optimizer.safetensors, state.json (step, loss curve)
    loss.tsv            the loss curve, rewritten at every checkpoint

Batches are drawn from ``(seed, step)`` alone, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted one would.

Names: B = batch, L = sequence length, H = hidden size, E = experts, K = experts per token, V = vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from demo_corpus import encode_documents, read_corpus, train_tokenizer, write_tokenizer_dir
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from streamer.models.args import ModelArgs
from streamer.models.moe_block import SparseMoeBlock
from streamer.models.qwen3_5_moe import Model
from streamer.synthetic.presets import _text_config

# Fields that do not change the trained weights: a resumed run may change them.
RESUMABLE_FIELDS = ("log_every", "eval_every", "checkpoint_every", "compile")


@dataclass
class TrainConfig:
    """Everything that decides the trained model, plus how often to log, evaluate and checkpoint."""

    seed: int = 0
    # Model shape.
    hidden_size: int = 128
    num_layers: int = 8
    num_experts: int = 64
    top_k: int = 8
    moe_intermediate_size: int = 64
    shared_intermediate_size: int = 128
    head_dim: int = 32
    full_attention_interval: int = 4
    vocab_tokens: int = 4096
    # Data: demo_corpus.SOURCES joined by "+" (a run saved before this field read the stdlib alone).
    corpus: str = "stdlib"
    held_out_every: int = 32
    max_corpus_chars: int | None = None
    # Optimisation.
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    max_grad_norm: float = 1.0
    # Bookkeeping.
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 50
    compile: bool = True

    def text_config(self, vocab_size: int) -> dict:
        """The checkpoint's text_config (all Qwen3.5-MoE keys; quantized dims multiples of 64)."""
        H = self.hidden_size
        return _text_config(
            hidden_size=H,
            num_hidden_layers=self.num_layers,
            num_attention_heads=H // self.head_dim,
            num_key_value_heads=max(1, H // self.head_dim // 2),
            head_dim=self.head_dim,
            vocab_size=vocab_size,
            linear_num_value_heads=H // self.head_dim,
            linear_num_key_heads=max(1, H // self.head_dim // 2),
            linear_key_head_dim=self.head_dim,
            linear_value_head_dim=self.head_dim,
            full_attention_interval=self.full_attention_interval,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            moe_intermediate_size=self.moe_intermediate_size,
            shared_expert_intermediate_size=self.shared_intermediate_size,
        )


# Named runs (tools/train_demo.py --preset): TrainConfig fields that differ from the defaults.
PRESETS = {
    # The shipped demo (streamer/assets/demo): 8 layers, 64 experts top-8, the 35B-A3B's routing shape.
    "demo": {},
    # The demo's geometry on the stdlib plus third-party packages: better on code it never saw (this
    # repository), worse on held-out stdlib files; not shipped yet (README, "The demo model").
    "demo-mix": {"corpus": "stdlib+site-packages", "steps": 550},
    # A routing-study model at the flagship's routing geometry in miniature (the 397B has 512 experts
    # top-10): 256 experts top-10, narrow and shallow so it trains on two CPU cores in about 30 minutes.
    # Its held-out decode routing (benchmarks/traces/) drives the cache-policy and cache-aware-routing
    # studies (benchmarks/bench_trained_routing.py, bench_approx_routing.py).
    "routing-study": {
        "hidden_size": 64,
        "num_layers": 4,
        "num_experts": 256,
        "top_k": 10,
        "moe_intermediate_size": 64,
        "shared_intermediate_size": 128,
        "steps": 1000,
    },
}


def vocab_size_for(n_tokens: int) -> int:
    """The embedding rows for a tokenizer of ``n_tokens``: rounded up to a multiple of 64."""
    return -(-n_tokens // 64) * 64


# ----------------------------------------------------------------------------------------------------
# The model: the project's Model with a MoE block that exposes its router for the auxiliary loss.


class RouterRecord:
    """Collects (router probabilities [..., E], chosen experts [..., K]) per MoE layer during one call."""

    def __init__(self):
        self.layers: list[tuple[mx.array, mx.array]] = []


class TrainableMoeBlock(SparseMoeBlock):
    """``SparseMoeBlock.__call__`` with gradients stopped at the top-k indices and the router recorded.

    The math is the block's own (tests check both give the same output); argpartition's indices are
    integers with no gradient, which MLX requires to be stated with ``stop_gradient``.
    """

    def __init__(self, args: ModelArgs, record: RouterRecord):
        super().__init__(args)
        self.record = record  # a plain object, so not part of the parameter tree

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)  # [B, L, E]
        indices = mx.stop_gradient(mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :])
        self.record.layers.append((probs, indices))
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = (self.experts(x, indices) * scores[..., None]).sum(axis=-2)
        return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def make_model(cfg: TrainConfig, vocab_size: int) -> tuple[Model, RouterRecord]:
    """The float32 training model, initialised from ``cfg.seed`` (see ``init_weights``)."""
    args = ModelArgs.from_dict(cfg.text_config(vocab_size))
    model = Model(args, dtype=mx.float32, delta_rule="chunked")
    record = RouterRecord()
    for layer in model.layers:
        layer.mlp = TrainableMoeBlock(args, record)
    model.update(init_weights(model, cfg.seed, cfg.num_layers))
    mx.eval(model.parameters())
    return model, record


# Projections that write into the residual stream: scaled down by 1/sqrt(2 * layers) (GPT-2).
_RESIDUAL_WRITERS = ("o_proj.weight", "out_proj.weight", "down_proj.weight")


def init_weights(model: nn.Module, seed: int, num_layers: int) -> dict:
    """Fresh values for every parameter, each from (seed, its name) alone, independent of build order.

    Linear: normal, std 1/sqrt(in) (residual writers smaller); embedding: normal std 1; norms: 1;
    router: near zero so routing starts balanced; DeltaNet A_log and dt_bias as in the Gated
    DeltaNet / Mamba-2 reference code (A in [1, 16], dt in [1e-3, 1e-1]).
    """
    out = []
    for name, p in tree_flatten(model.parameters()):
        rng = np.random.default_rng([seed, *name.encode()])
        shape = p.shape
        if name.endswith("A_log"):
            v = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith("dt_bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            v = dt + np.log(-np.expm1(-dt))  # softplus^-1(dt)
        elif name.endswith("norm.weight"):
            v = np.ones(shape)
        elif name.endswith("conv1d.weight"):
            v = rng.uniform(-1, 1, shape) / math.sqrt(shape[1])
        elif name.endswith("embed_tokens.weight"):
            v = rng.standard_normal(shape)
        else:
            std = 1.0 / math.sqrt(shape[-1])
            if name.endswith(_RESIDUAL_WRITERS):
                std /= math.sqrt(2 * num_layers)
            if name.endswith("mlp.gate.weight"):
                std *= 0.1
            v = rng.standard_normal(shape) * std
        out.append((name, mx.array(v.astype(np.float32))))
    return tree_unflatten(out)


# ----------------------------------------------------------------------------------------------------
# Losses.


def balance_loss(probs: mx.array, indices: mx.array, num_experts: int) -> mx.array:
    """Switch / Qwen load-balancing loss: E * sum_e f_e * P_e (1.0 when routing is uniform).

    f_e is the fraction of token-expert assignments that went to e, P_e the mean router probability of e.
    """
    probs = probs.reshape(-1, num_experts)  # [T, E]
    K = indices.shape[-1]
    one_hot = indices.reshape(-1, K)[..., None] == mx.arange(num_experts)  # [T, K, E]
    f = one_hot.sum(axis=(0, 1)) / (probs.shape[0] * K)
    return num_experts * (f * probs.mean(axis=0)).sum()


def make_loss_fn(model: Model, record: RouterRecord, aux_coef: float) -> Callable:
    E = model.args.num_experts

    def loss_fn(model: Model, x: mx.array, y: mx.array):
        record.layers.clear()
        ce = nn.losses.cross_entropy(model(x), y).mean()
        aux = mx.stack([balance_loss(p, i, E) for p, i in record.layers]).mean()
        record.layers.clear()
        return ce + aux_coef * aux, (ce, aux)

    return loss_fn


def mean_loss(model: Model, windows: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over windows [N, L + 1] of a token stream."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = mx.array(windows[i : i + batch_size].astype(np.int32))
        ce = nn.losses.cross_entropy(model(w[:, :-1]), w[:, 1:], reduction="sum")
        total += ce.item()
        count += w[:, 1:].size
    return total / count


def eval_windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` windows of ``seq_len + 1`` tokens spread evenly over a stream: [n, seq_len + 1]."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def batch_for_step(tokens: np.ndarray, cfg: TrainConfig, step: int) -> tuple[mx.array, mx.array]:
    """Random windows, drawn from (seed, step) alone: inputs and targets [B, L]."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, cfg.batch_size)
    w = np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int32)
    return mx.array(w[:, :-1]), mx.array(w[:, 1:])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW; linear warm-up, then cosine decay to ``final_lr_fraction`` of the peak."""
    warmup = optim.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps)
    decay = optim.cosine_decay(
        cfg.learning_rate, max(1, cfg.steps - cfg.warmup_steps), cfg.learning_rate * cfg.final_lr_fraction
    )
    schedule = optim.join_schedules([warmup, decay], [cfg.warmup_steps])
    return optim.AdamW(schedule, betas=[0.9, 0.95], weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------------
# The run directory: data preparation, checkpoints.


def prepare_run(run_dir: Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
    """Writes the config, trains the tokenizer and encodes the corpus, unless already done.

    Raises:
        ValueError: ``run_dir`` holds a run with another config (other than ``RESUMABLE_FIELDS``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "train_config.json"
    if cfg_file.exists():
        saved = json.loads(cfg_file.read_text())
        ours = dataclasses.asdict(cfg)
        defaults = dataclasses.asdict(TrainConfig())  # fields added since the run was saved
        diff = {
            k: (saved.get(k, defaults[k]), v)
            for k, v in ours.items()
            if saved.get(k, defaults[k]) != v and k not in RESUMABLE_FIELDS
        }
        if diff:
            raise ValueError(
                f"{run_dir} holds a run with another config (saved, given): {diff}; "
                "pass the same options to resume it, or choose a new --out directory"
            )
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if (run_dir / "tokens.npz").exists():
        return
    t0 = time.perf_counter()
    corpus = read_corpus(
        held_out_every=cfg.held_out_every,
        max_chars=cfg.max_corpus_chars,
        sources=tuple(cfg.corpus.split("+")),
    )
    tok = train_tokenizer(corpus.train, cfg.vocab_tokens)
    write_tokenizer_dir(tok, run_dir / "tokenizer")
    train, held_out = encode_documents(tok, corpus.train), encode_documents(tok, corpus.held_out)
    (run_dir / "corpus.json").write_text(
        json.dumps(
            {
                **corpus.summary(),
                "train_tokens": len(train),
                "held_out_tokens": len(held_out),
                "held_out_names": corpus.held_out_names,
            },
            indent=2,
        )
    )
    tmp = run_dir / "tokens.partial.npz"
    np.savez(tmp, train=train, held_out=held_out)
    tmp.rename(run_dir / "tokens.npz")
    seconds = time.perf_counter() - t0
    log(f"corpus: {len(train):,} training / {len(held_out):,} held-out tokens ({seconds:.0f} s)")


def load_tokens(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(run_dir / "tokens.npz")
    return data["train"], data["held_out"]


def n_tokens(run_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(run_dir / "tokenizer" / "tokenizer.json")).get_vocab_size(True)


def save_checkpoint(run_dir: Path, model: Model, optimizer: optim.Optimizer, step: int, curve: list) -> None:
    """Writes checkpoint/ atomically (a new directory renamed over the old) and loss.tsv."""
    tmp, final, old = run_dir / "checkpoint.partial", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, "curve": curve}))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    write_curve(run_dir / "loss.tsv", curve)


def load_checkpoint(run_dir: Path, model: Model, optimizer: optim.Optimizer) -> tuple[int, list]:
    """Restores weights and optimizer state; returns (step, curve), or (0, []) when none is saved."""
    ckpt = run_dir / "checkpoint"
    if not ckpt.exists() and (run_dir / "checkpoint.old").exists():
        ckpt = run_dir / "checkpoint.old"  # interrupted between the two renames
    if not ckpt.exists():
        return 0, []
    model.load_weights(str(ckpt / "model.safetensors"), strict=True)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    state = json.loads((ckpt / "state.json").read_text())
    return state["step"], state["curve"]


CURVE_COLUMNS = ("step", "tokens", "elapsed_s", "lr", "loss", "ce", "aux", "grad_norm", "held_out_ce")


def write_curve(path: Path, curve: list[dict]) -> None:
    lines = ["\t".join(CURVE_COLUMNS)]
    for row in curve:
        lines.append("\t".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in CURVE_COLUMNS))
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# The loop.


def make_train_step(
    model: Model, record: RouterRecord, optimizer: optim.Optimizer, cfg: TrainConfig
) -> Callable:
    """(inputs, targets) -> (loss, ce, aux, grad norm), updating the model; compiled unless told not to."""
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(model, record, cfg.aux_loss_coef))

    def train_step(x: mx.array, y: mx.array):
        (loss, (ce, aux)), grads = loss_and_grad(model, x, y)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        optimizer.update(model, grads)
        return loss, ce, aux, grad_norm

    if not cfg.compile:
        return train_step
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(train_step)


def train(
    run_dir: Path,
    cfg: TrainConfig,
    progress: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Trains (or resumes) the run in ``run_dir`` up to ``cfg.steps``; returns the loss curve.

    ``progress`` gets each curve row as it is made. On KeyboardInterrupt (also one raised by
    ``progress``) the last finished step is checkpointed before the exception propagates.
    """
    run_dir = Path(run_dir)
    prepare_run(run_dir, cfg, log)
    train_tokens, held_out_tokens = load_tokens(run_dir)
    model, record = make_model(cfg, vocab_size_for(n_tokens(run_dir)))
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    step, curve = load_checkpoint(run_dir, model, optimizer)
    if step:
        log(f"resuming {run_dir} at step {step}/{cfg.steps}")
    train_step = make_train_step(model, record, optimizer, cfg)
    held_out = eval_windows(held_out_tokens, 16, cfg.seq_len)
    saved_step = step
    # The last finished step: Ctrl-C lands when mx.eval returns, after the model already holds the
    # next step's weights, so an interrupt restores these before checkpointing.
    finished = (step, model.parameters(), tree_map(lambda a: a, optimizer.state))
    try:
        while step < cfg.steps:
            t0, lr = time.perf_counter(), optimizer.learning_rate.item()
            out = train_step(*batch_for_step(train_tokens, cfg, step))
            mx.eval(out, model.parameters(), optimizer.state)
            loss, ce, aux, grad_norm = (v.item() for v in out)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower --lr or check the data")
            step += 1
            elapsed = (curve[-1]["elapsed_s"] if curve else 0.0) + time.perf_counter() - t0
            held_out_ce = (
                mean_loss(model, held_out) if step % cfg.eval_every == 0 or step == cfg.steps else None
            )
            curve.append(
                {"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "elapsed_s": elapsed, "lr": lr,
                 "loss": loss, "ce": ce, "aux": aux, "grad_norm": grad_norm, "held_out_ce": held_out_ce}
            )  # fmt: skip
            finished = (step, model.parameters(), tree_map(lambda a: a, optimizer.state))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(run_dir, model, optimizer, step, curve)
                saved_step = step
            if progress:
                progress(curve[-1])
    except KeyboardInterrupt:
        step, params, opt_state = finished
        model.update(params)
        optimizer.state = opt_state
        curve[:] = [r for r in curve if r["step"] <= step]
        if step > saved_step:
            save_checkpoint(run_dir, model, optimizer, step, curve)
        log(f"interrupted: checkpoint at step {step} in {run_dir}; run again to resume")
        raise
    return curve


# ----------------------------------------------------------------------------------------------------
# Export: the trained float weights, quantized and written exactly as mlx-community publishes.


def export_checkpoint(
    run_dir: Path, dst: Path, dtype: str = "bfloat16", extra_info: dict | None = None
) -> Path:
    """Writes the run's last checkpoint as an mlx-community Qwen3.5-MoE checkpoint (4-bit g64, 8-bit gates).

    Raises:
        FileNotFoundError: the run has no checkpoint yet.
        ValueError: the trained weights do not match the checkpoint's parameter plan.
    """
    from streamer.synthetic.params import plan_params
    from streamer.synthetic.presets import DEMO_GENERATION, Preset
    from streamer.synthetic.writer import generate

    run_dir = Path(run_dir)
    cfg = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    weights_file = run_dir / "checkpoint" / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(
            f"{weights_file} not found: train first (tools/train_demo.py --out {run_dir})"
        )
    weights = {k: np.array(v) for k, v in mx.load(str(weights_file)).items()}
    text_config = cfg.text_config(vocab_size_for(n_tokens(run_dir)))
    plan = {p.name: p.shape for p in plan_params(text_config)}
    got = {k: w.shape for k, w in weights.items()}
    if plan != got:
        diff = sorted(set(plan.items()) ^ set(got.items()))[:3]
        raise ValueError(f"{weights_file}: trained tensors differ from the checkpoint plan, e.g. {diff}")

    def value_fn(param, expert):
        w = weights[param.name]
        return w if expert is None else w[expert]

    what = "Python standard library" if cfg.corpus == "stdlib" else "Python standard library and package"
    preset = Preset(
        "trained-demo",
        f"Qwen3.5-MoE trained on {what} source",
        text_config,
        generation=DEMO_GENERATION,
    )
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    generate(dst, preset, dtype=dtype, seed=cfg.seed, value_fn=value_fn, tokenizer_dir=run_dir / "tokenizer")
    corpus = json.loads((run_dir / "corpus.json").read_text())
    info = {
        "description": f"a small Qwen3.5-MoE trained on {what} source (tools/train_demo.py)",
        "train_config": dataclasses.asdict(cfg),
        "steps": state["step"],
        "tokens_seen": state["step"] * cfg.batch_size * cfg.seq_len,
        "train_elapsed_s": state["curve"][-1]["elapsed_s"] if state["curve"] else 0.0,
        "corpus": {k: v for k, v in corpus.items() if k != "held_out_names"},
        "python": platform.python_version(),  # whose stdlib was the corpus
        **(extra_info or {}),
    }
    (Path(dst) / "synthetic.json").unlink()  # generate()'s provenance note; training.json replaces it
    (Path(dst) / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(dst)
