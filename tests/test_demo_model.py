"""The trained demo model: its training tool, the shipped checkpoint, and what training bought.

The training tool (tools/) runs a few steps of a tiny config here. The shipped checkpoint
(streamer/assets/demo) is checked as an mlx-community checkpoint (layout, quantization, mlx-lm logits),
and against baselines on held-out stdlib files: its loss must beat the untrained initialisation and the
best unigram model of the same text, and its routing must be clearly less uniform than that of a
random-weight model of the same shape.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from streamer.models.args import ModelArgs
from streamer.models.load import load_model
from streamer.models.moe_block import SparseMoeBlock
from streamer.synthetic import demo
from streamer.synthetic.presets import Preset
from streamer.synthetic.writer import generate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from demo_eval import held_out_windows, init_model_for, routing_stats, unigram_entropy  # noqa: E402
from demo_training import (  # noqa: E402
    RouterRecord,
    TrainableMoeBlock,
    TrainConfig,
    balance_loss,
    mean_loss,
    train,
)

ASSET = demo.DEMO_ASSET
# Two layers (one DeltaNet, one attention), 8 experts top-2, a 512-token BPE on a 60k-character slice.
TINY = dict(
    hidden_size=64,
    num_layers=2,
    full_attention_interval=2,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=64,
    shared_intermediate_size=64,
    vocab_tokens=512,
    max_corpus_chars=60_000,
    batch_size=4,
    seq_len=64,
    learning_rate=1e-2,
    warmup_steps=2,
    eval_every=1000,
    checkpoint_every=1000,
    compile=False,
)


def _quiet(_msg: str) -> None:
    pass


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a


# ----------------------------------------------------------------------------------------------------
# The training tool.


def test_training_loss_falls(tmp_path):
    run = tmp_path / "run"
    curve = train(run, TrainConfig(**TINY, steps=12), log=_quiet)
    assert [r["step"] for r in curve] == list(range(1, 13))
    first, last = curve[0]["ce"], np.mean([r["ce"] for r in curve[-3:]])
    assert last < first - 0.5, f"cross-entropy went from {first:.3f} to {last:.3f}"
    assert len((run / "loss.tsv").read_text().splitlines()) == 1 + 12
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (run / "tokenizer" / name).is_file()


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    cfg = TrainConfig(**TINY, steps=4)
    straight = train(tmp_path / "a", cfg, log=_quiet)

    def interrupt_at_2(row):
        if row["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", cfg, interrupt_at_2, log=_quiet)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = train(tmp_path / "b", cfg, log=_quiet)

    for key in ("loss", "ce", "aux"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    a = mx.load(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = mx.load(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    with pytest.raises(ValueError, match="another config"):
        train(tmp_path / "b", TrainConfig(**{**TINY, "seed": 1}, steps=4), log=_quiet)


def test_continued_run_takes_the_longer_runs_schedule_after_its_rewarm(tmp_path):
    import train_demo

    short, long = TrainConfig(**TINY, steps=4), TrainConfig(**TINY, steps=10)
    first = train(tmp_path / "a", short, log=_quiet)
    straight = train(tmp_path / "c", long, log=_quiet)
    with pytest.raises(ValueError, match="another config"):
        train_demo.start_continuation(
            tmp_path / "a", tmp_path / "x", TrainConfig(**{**TINY, "seed": 1}, steps=10), 2
        )
    train_demo.start_continuation(tmp_path / "a", tmp_path / "b", long, rewarm_steps=2)
    with train_demo.continued_optimizer(tmp_path / "b", long) as info:
        assert info["from_steps"] == 4 and info["rewarm_steps"] == 2
        continued = train(tmp_path / "b", long, log=_quiet)
    assert [r["step"] for r in continued] == list(range(1, 11))
    assert [r["loss"] for r in continued[:4]] == [r["loss"] for r in first]
    lr, straight_lr = [r["lr"] for r in continued], [r["lr"] for r in straight]
    # Row k logs the rate read before its step: step k - 1's. Step 5 (row 6) takes the short run's floor,
    # far below the long run's rate there; the re-warm climbs from it; from step 4 + 2 + 1 on (row 8) the
    # rates are the long run's.
    assert lr[5] < 0.2 * straight_lr[5] and lr[5] < lr[6] < lr[7]
    assert lr[7:] == pytest.approx(straight_lr[7:], rel=1e-6)
    # The context put demo_training's own optimizer back: a fresh run takes the ordinary schedule.
    again = train(tmp_path / "d", long, log=_quiet)
    assert [r["lr"] for r in again] == straight_lr


def test_train_demo_cli_trains_exports_and_evaluates(tmp_path, capsys):
    import train_demo

    tiny = "--layers 2 --hidden 64 --experts 8 --top-k 2 --expert-inter 64 --vocab-tokens 512"
    tiny += " --max-corpus-chars 60000 --batch 2 --seq-len 64 --steps 3 --no-compile --no-openblas"
    ckpt = tmp_path / "ckpt"
    assert train_demo.main([*tiny.split(), "--out", str(tmp_path / "run"), "--export", str(ckpt)]) == 0
    assert "step     3/3" in capsys.readouterr().out
    info = json.loads((ckpt / "training.json").read_text())
    assert info["steps"] == 3 and info["evaluation"]["held_out_loss_nats"]["exported"] > 0
    model, args = load_model(ckpt, dtype="float32")
    assert args.num_experts == 8 and model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


def test_trainable_block_is_the_models_block():
    args = ModelArgs.from_dict(TrainConfig(**TINY).text_config(512))
    block, record = SparseMoeBlock(args), RouterRecord()
    trainable = TrainableMoeBlock(args, record)
    trainable.update(block.parameters())
    x = mx.random.normal((2, 16, args.hidden_size), key=mx.random.key(0))
    assert mx.allclose(block(x), trainable(x), atol=1e-6).item()
    assert len(record.layers) == 1 and record.layers[0][1].shape == (2, 16, args.num_experts_per_tok)


def test_balance_loss_is_one_when_uniform_and_grows_with_collapse():
    E, K, T = 8, 2, 64
    uniform = mx.full((T, E), 1 / E)
    spread = mx.array(np.arange(T * K).reshape(T, K) % E)
    assert abs(balance_loss(uniform, spread, E).item() - 1.0) < 1e-6
    collapsed = mx.array(np.eye(E)[np.zeros(T, dtype=int)] * 0.9 + 0.1 / E)
    assert balance_loss(collapsed, mx.zeros((T, K), dtype=mx.int32), E).item() > 5


# ----------------------------------------------------------------------------------------------------
# The shipped checkpoint.


@pytest.fixture(scope="module")
def held_out():
    """4 windows of 129 tokens from this machine's held-out stdlib files, in the shipped tokenizer."""
    info = json.loads((ASSET / "training.json").read_text())
    return held_out_windows(ASSET / "tokenizer.json", 4, 128, info["train_config"]["held_out_every"])


@pytest.fixture(scope="module")
def shipped():
    model, _ = load_model(ASSET, dtype="float32")
    return model


def test_demo_is_the_shipped_checkpoint():
    assert demo.has_trained_demo()
    assert demo.demo_checkpoint() == ASSET
    assert "trained on Python source" in demo.DEMO_NOTICE


def test_shipped_checkpoint_is_an_mlx_community_checkpoint():
    config = json.loads((ASSET / "config.json").read_text())
    tc, quant = config["text_config"], config["quantization"]
    assert tc["num_hidden_layers"] >= 8 and tc["num_experts"] >= 64 and tc["num_experts_per_tok"] >= 8
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 64, "affine")
    gates = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert len(gates) == 2 * tc["num_hidden_layers"]
    assert all(v == {"group_size": 64, "bits": 8} for v in gates.values())
    assert all(k.endswith(("mlp.gate", "shared_expert_gate")) for k in gates)
    n_bytes = sum(p.stat().st_size for p in ASSET.iterdir())
    assert n_bytes <= 20 << 20, f"{n_bytes / 2**20:.1f} MiB is too big to ship"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSET / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    assert tc["vocab_size"] == -(-n // 64) * 64
    assert tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<think>") is not None
    assert (ASSET / "chat_template.jinja").read_text().startswith("{%")


def test_shipped_checkpoint_matches_mlx_lm(held_out):
    """mlx-lm loads it and gives our logits. Both run float32 on the same float32-cast weights: our
    loader keeps bf16 scales, so its quantized embedding rounds its output to bf16 (up to ~0.2 on these
    logits) where mlx-lm on cast weights does not; with the cast on both sides only op order differs."""
    mlx_lm = pytest.importorskip("mlx_lm")
    ref, ref_tok = mlx_lm.load(str(ASSET))
    ours, _ = load_model(ASSET, dtype="float32")
    ref.update(tree_map(_f32, ref.parameters()))
    ours.update(tree_map(_f32, ours.parameters()))
    tokens = mx.array(held_out[:1, :64].astype(np.int32))
    diff = mx.abs(ref(tokens) - ours(tokens)).max().item()
    assert diff < 1e-4, diff
    from tokenizers import Tokenizer

    text = "def main(argv):\n    return 0\n"
    assert ref_tok.encode(text) == Tokenizer.from_file(str(ASSET / "tokenizer.json")).encode(text).ids


def test_shipped_model_beats_unigram_and_its_initialisation(held_out, shipped):
    trained = mean_loss(shipped, held_out)
    untrained = mean_loss(init_model_for(ASSET), held_out)
    unigram = unigram_entropy(held_out[:, 1:])  # the best any unigram model can do on these tokens
    print(f"held-out nats/token: trained {trained:.3f}, untrained {untrained:.3f}, unigram {unigram:.3f}")
    assert trained < unigram < untrained
    assert math.exp(trained) < 0.5 * math.exp(unigram)


def test_shipped_model_routes_less_uniformly_than_random_weights(tmp_path, held_out, shipped):
    config = json.loads((ASSET / "config.json").read_text())
    preset = Preset("random-like-demo", "random weights, the demo's shape", config["text_config"])
    random_ckpt = generate(tmp_path / "random", preset, dtype="bfloat16", seed=0, tokenizer_dir=ASSET)
    random_model, _ = load_model(random_ckpt, dtype="float32")
    ours, theirs = routing_stats(shipped, held_out), routing_stats(random_model, held_out)
    print(
        f"entropy bits trained {ours['mean_entropy_bits']:.3f} random {theirs['mean_entropy_bits']:.3f}"
        f" (uniform {ours['uniform_entropy_bits']:.3f}); reuse trained {ours['mean_reuse']:.3f}"
        f" random {theirs['mean_reuse']:.3f} (independent {ours['independent_reuse']:.3f})"
    )
    assert ours["mean_reuse"] > theirs["mean_reuse"] + 0.05
    assert ours["mean_entropy_bits"] < theirs["mean_entropy_bits"]


# ----------------------------------------------------------------------------------------------------
# The demo module's fallback and packing.


def test_missing_asset_falls_back_to_the_random_preset(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_ASSET", tmp_path / "absent")
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))
    built = []
    monkeypatch.setattr(demo, "generate", lambda path, preset, **kw: built.append((path, preset.name)))
    assert not demo.has_trained_demo()
    path = demo.demo_checkpoint()
    assert built == [(path, demo.DEMO_PRESET)] and path.parent == tmp_path / "cache"


def test_demo_packed_repacks_the_shipped_checkpoint_once(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    packed = demo.demo_packed()
    assert (packed / "manifest.json").is_file() and packed.parent == tmp_path / "home" / "models"
    mtime = (packed / "manifest.json").stat().st_mtime_ns
    assert demo.demo_packed() == packed
    assert (packed / "manifest.json").stat().st_mtime_ns == mtime
