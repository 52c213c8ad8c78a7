"""Our Qwen3.5-MoE model against mlx-lm's on synthetic checkpoints of every preset.

mlx-lm is the numerical reference (test-only dependency): logits of a 32-token prompt and of 32
cached decode steps agree within 1e-4, greedy decoding is token-identical, and our own cached and
uncached runs agree. Checkpoints are f32 so CPU results are comparable to rounding.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from streamer.errors import CheckpointError, ConfigError
from streamer.models.args import ModelArgs
from streamer.models.layer_cache import restore_caches, snapshot_caches
from streamer.models.load import load_model
from streamer.models.quantization import QuantSpec
from streamer.models.resident_experts import ResidentExperts
from streamer.synthetic.writer import generate

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

PRESETS = ["tiny", "like-397b", "like-35b", "reap", "mixed", "q8"]
ATOL = 1e-4


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset, dtype="float32") -> directory, each built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(preset: str, dtype: str = "float32"):
        if (preset, dtype) not in built:
            built[preset, dtype] = generate(root / f"{preset}-{dtype}", preset, dtype=dtype, seed=0)
        return built[preset, dtype]

    return get


def _reference(path):
    model, _ = mlx_lm_utils.load_model(path)
    return model


def _prompt(vocab_size: int, n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, (1, n)))


def _max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def _greedy(model, prompt: mx.array, n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(prompt, cache=cache)
    tokens = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1:], axis=-1)
        tokens.append(token.item())
        logits = model(token, cache=cache)
    return tokens


# ----------------------------------------------------------------------------------------------------
# Against mlx-lm.


@pytest.mark.parametrize("delta_rule", ["chunked", "recurrent"])
@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_and_decode_logits_match_mlx_lm(checkpoint, preset, delta_rule):
    path = checkpoint(preset)
    ref = _reference(path)
    model, args = load_model(path, delta_rule=delta_rule)
    prompt = _prompt(args.vocab_size, 32)
    ref_cache, cache = ref.make_cache(), model.make_cache()

    expected, got = ref(prompt, cache=ref_cache), model(prompt, cache=cache)
    assert got.shape == expected.shape == (1, 32, args.vocab_size)
    diffs = [_max_diff(got, expected)]
    for _ in range(32):
        token = mx.argmax(expected[:, -1:], axis=-1)  # the reference chooses the path
        expected, got = ref(token, cache=ref_cache), model(token, cache=cache)
        diffs.append(_max_diff(got, expected))
    print(f"{preset} {delta_rule}: prefill {diffs[0]:.2e}, decode max {max(diffs[1:]):.2e}")
    assert diffs[0] < ATOL, f"prefill logits differ by {diffs[0]}"
    assert max(diffs[1:]) < ATOL, f"decode logits differ by up to {max(diffs[1:])}"


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_tokens_match_mlx_lm(checkpoint, preset):
    path = checkpoint(preset)
    model, args = load_model(path)
    prompt = _prompt(args.vocab_size, 16, seed=1)
    assert _greedy(model, prompt, 64) == _greedy(_reference(path), prompt, 64)


def test_bf16_checkpoint_loads_and_runs(checkpoint):
    path = checkpoint("mixed", "bfloat16")
    for dtype in (None, "bfloat16"):
        model, args = load_model(path, dtype=dtype)
        logits = model(_prompt(args.vocab_size, 8))
        assert logits.dtype == (mx.float32 if dtype is None else mx.bfloat16)  # CPU default: f32
        assert mx.all(mx.isfinite(logits)).item()
    # With bf16 activations we run what mlx-lm runs; allow a few bf16 ulps of logits of size ~5.
    # (f32 activations over the same weights differ from mlx-lm's bf16 run by ~1: bf16 drift.)
    prompt = _prompt(args.vocab_size, 32)
    ours, _ = load_model(path, dtype="bfloat16")
    assert _max_diff(ours(prompt), _reference(path)(prompt)) < 0.1


# ----------------------------------------------------------------------------------------------------
# Our own paths agree with each other.


@pytest.mark.parametrize("preset", PRESETS)
def test_cache_matches_no_cache(checkpoint, preset):
    # Every preset has 3 DeltaNet layers and 1 attention layer: both cache kinds are exercised,
    # including multi-token calls that continue from a non-empty cache (chunked rule with a state,
    # causal mask with an offset).
    model, args = load_model(checkpoint(preset))
    tokens = _prompt(args.vocab_size, 48, seed=2)
    full = model(tokens)
    cache = model.make_cache()
    pieces, start = [], 0
    for size in [20, 1, 1, 7, 1, 18]:
        pieces.append(model(tokens[:, start : start + size], cache=cache))
        start += size
    assert start == 48
    assert _max_diff(mx.concatenate(pieces, axis=1), full) < ATOL
    offsets = {c.offset for c in cache}
    assert offsets == {48}


def test_snapshot_restore_repeats_decode(checkpoint):
    model, args = load_model(checkpoint("tiny"))
    cache = model.make_cache()
    model(_prompt(args.vocab_size, 12), cache=cache)
    snap = snapshot_caches(cache)
    token = mx.array([[3]])
    first = [model(token, cache=cache) for _ in range(4)]
    restore_caches(cache, snap)
    again = [model(token, cache=cache) for _ in range(4)]
    for a, b in zip(first, again, strict=True):
        assert mx.array_equal(a, b).item()


class _Recording:
    """An experts object that is not an nn.Module: counts calls and delegates (or breaks the math)."""

    def __init__(self, inner, broken=False):
        self.inner, self.broken, self.calls = inner, broken, 0

    def __call__(self, x, indices):
        self.calls += 1
        assert indices.shape == x.shape[:-1] + (indices.shape[-1],)
        y = self.inner(x, indices)
        return mx.zeros_like(y) if self.broken else y


def test_experts_are_replaceable(checkpoint):
    model, args = load_model(checkpoint("tiny"))
    prompt = _prompt(args.vocab_size, 10)
    expected = model(prompt)
    wrappers = [_Recording(layer.mlp.experts) for layer in model.layers]
    for layer, wrapper in zip(model.layers, wrappers, strict=True):
        layer.mlp.replace_experts(wrapper)
    assert not any("switch_mlp" in k for k in _param_names(model))
    assert mx.array_equal(model(prompt), expected).item()
    assert all(w.calls == 1 for w in wrappers)
    model.layers[1].mlp.replace_experts(_Recording(wrappers[1].inner, broken=True))
    assert _max_diff(model(prompt), expected) > 1e-3  # a wrong expert result must show


def _param_names(model):
    return [k for k, _ in tree_flatten(model.parameters())]


@pytest.mark.parametrize("tokens", [3, 40])  # 3 x 4 pairs: gathered as is; 40 x 4: sorted by expert
def test_resident_experts_equal_per_expert_loop(tokens):
    H, I, E, K = 64, 32, 8, 4
    experts = ResidentExperts(H, I, E)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, tokens, H), dtype=np.float32))
    indices = mx.array(rng.integers(0, E, (1, tokens, K)))
    y = experts(x, indices)
    assert y.shape == (1, tokens, K, H)
    gate, up, down = (experts[p].weight for p in ("gate_proj", "up_proj", "down_proj"))
    for t in range(tokens):
        for j in range(K):
            e = indices[0, t, j].item()
            h = x[0, t] @ gate[e].T
            expected = (h * mx.sigmoid(h) * (x[0, t] @ up[e].T)) @ down[e].T
            assert _max_diff(y[0, t, j], expected) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Config and loader errors.


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_model_args_nested_and_flat(checkpoint):
    config = _config(checkpoint("tiny"))
    nested = ModelArgs.from_dict({**config, "unknown_key": 1})
    flat = ModelArgs.from_dict(config["text_config"])  # model_type "qwen3_5_moe_text"
    assert nested == flat
    assert ModelArgs.from_dict({**config["text_config"], "model_type": "qwen3_5_moe"}).hidden_size == 128
    assert nested.is_linear == (True, True, True, False)
    assert nested.rotary_dim == 8 and nested.rope_theta == 1e7  # head_dim 32 x 0.25
    no_head_dim = {k: v for k, v in config["text_config"].items() if k != "head_dim"}
    assert ModelArgs.from_dict(no_head_dim).head_dim == 128 // 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"text_config": {"model_type": "qwen3_5_moe_text"}}, "missing required"),
        ({"full_attention_interval": 2}, "layer_types"),
    ],
)
def test_model_args_errors(checkpoint, change, message):
    config = _config(checkpoint("tiny"))
    if "full_attention_interval" in change:
        config["text_config"] = {**config["text_config"], **change}
    else:
        config.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_dict(config)


def test_quant_spec_entries_and_inference():
    p = "language_model.model.layers.0.mlp"
    shapes = {
        f"{p}.gate.weight": (16, 32),  # 8-bit, 128 inputs, group 64
        f"{p}.gate.scales": (16, 2),
        f"{p}.up.weight": (16, 16),  # 4-bit g64 or 8-bit g32: both 128 inputs, 2 vs 4 groups
        f"{p}.up.scales": (16, 2),
        f"{p}.odd.weight": (16, 24),  # 6-bit, 128 inputs, group 64
        f"{p}.odd.scales": (16, 2),
        f"{p}.dense.weight": (16, 128),
    }
    spec = QuantSpec({"group_size": 64, "bits": 4, f"{p}.gate": {"group_size": 64, "bits": 8}}, shapes)
    assert spec.quant_for(f"{p}.gate") == (8, 64, "affine")
    assert spec.quant_for(f"{p}.up") == (4, 64, "affine")
    assert spec.quant_for(f"{p}.up", in_dims=128) == (4, 64, "affine")
    assert spec.quant_for(f"{p}.odd") == (6, 64, "affine")
    assert spec.quant_for(f"{p}.dense") is None
    with pytest.raises(CheckpointError, match=f"{p}.up"):
        spec.quant_for(f"{p}.up", in_dims=100)  # no bits / group size gives 16 words and 2 groups
    bad = QuantSpec({"group_size": 64, "bits": 4, f"{p}.up": {"group_size": 64, "bits": 8}}, shapes)
    with pytest.raises(CheckpointError, match="do not fit 8-bit"):
        bad.quant_for(f"{p}.up")


def test_mixed_checkpoint_quantization_is_resolved_like_mlx_lm(checkpoint):
    model, _ = load_model(checkpoint("mixed"))
    ref = _reference(checkpoint("mixed"))
    ours = {k: (m.bits, m.group_size) for k, m in model.named_modules() if hasattr(m, "bits")}
    theirs = {k: (m.bits, m.group_size) for k, m in ref.named_modules() if hasattr(m, "bits")}
    assert ours == theirs
    assert {bits for bits, _ in ours.values()} == {2, 3, 4, 5, 6, 8}


def _copy_without(src, dst, drop=None, add=None):
    """A copy of checkpoint src with one tensor dropped from (or one added to) the first shard."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / sorted(set(index["weight_map"].values()))[0]
    tensors = dict(mx.load(str(shard)))
    if drop:
        tensors.pop(drop)
        index["weight_map"].pop(drop)
    if add:
        tensors[add] = mx.zeros((2,))
        index["weight_map"][add] = shard.name
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_loader_names_missing_and_unexpected_tensors(checkpoint, tmp_path):
    src = checkpoint("tiny")
    name = "language_model.model.layers.1.linear_attn.A_log"
    with pytest.raises(CheckpointError, match=name):
        load_model(_copy_without(src, tmp_path / "missing", drop=name))
    extra = "language_model.model.layers.1.linear_attn.surprise"
    with pytest.raises(CheckpointError, match=extra):
        load_model(_copy_without(src, tmp_path / "extra", add=extra))
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------
# Long prompts whose DeltaNet state carries across chunks.


def _slow_decay_copy(src, dst):
    """``src`` with every DeltaNet layer decaying slowly (g = exp(-exp(A_log) * softplus(a + dt_bias))
    close to 1): the random initialisation decays so fast that state crossing a 64-token chunk is ~1e-17,
    which hides any error in how the chunked form carries it."""
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(mx.load(str(shard)))
    for name in list(tensors):
        if name.endswith("linear_attn.A_log"):
            tensors[name] = mx.full(tensors[name].shape, float(np.log(0.02)), tensors[name].dtype)
        elif name.endswith("linear_attn.dt_bias"):
            tensors[name] = mx.full(tensors[name].shape, -2.0, tensors[name].dtype)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "mlx"})
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("preset", ["tiny", "like-35b"])
def test_long_prompt_with_carried_state_matches_mlx_lm(checkpoint, preset, tmp_path):
    path = _slow_decay_copy(checkpoint(preset), tmp_path / "slow")
    ref = _reference(path)
    chunked, args = load_model(path)
    recurrent, _ = load_model(path, delta_rule="recurrent")
    prompt = _prompt(args.vocab_size, 200, seed=3)  # three full 64-token chunks and a partial one
    want = ref(prompt, cache=ref.make_cache())
    got, slow = chunked(prompt, cache=chunked.make_cache()), recurrent(prompt, cache=recurrent.make_cache())
    # float32 drift of the chunk-parallel form over 200 tokens of carried state is ~1.2e-4; a state
    # carried off by one token at a chunk end is ~0.2-0.4: 1e-3 separates the two.
    assert _max_diff(got, want) < 1e-3, f"chunked prefill differs from mlx-lm by {_max_diff(got, want)}"
    assert _max_diff(slow, want) < ATOL
    # The state really carries: restarting the DeltaNet layers at token 128 changes late logits.
    cache = chunked.make_cache()
    chunked(prompt[:, :128], cache=cache)
    fresh = chunked.make_cache()
    for i, lin in enumerate(args.is_linear):
        if not lin:
            fresh[i] = cache[i]  # keep attention's KV; only DeltaNet state is dropped
    late_restarted = chunked(prompt[:, 128:], cache=fresh)
    assert _max_diff(late_restarted[:, -1], want[:, -1]) > 1e-3


# ----------------------------------------------------------------------------------------------------
# bfloat16 activations, as a Mac runs the published checkpoints.


def test_bf16_greedy_tokens_match_mlx_lm_after_multi_token_prompts(checkpoint):
    """With bf16 activations on a CPU, 12-token prompts then 16 greedy tokens equal mlx-lm's: the prompt
    runs the recurrent delta rule as mlx-lm's CPU path does (the chunked form's order diverged here)."""
    path = checkpoint("tiny", "bfloat16")
    ref = _reference(path)
    model, args = load_model(path, dtype="bfloat16")
    assert model.layers[0].linear_attn.delta_rule == "recurrent"
    for seed in range(6):
        prompt = _prompt(args.vocab_size, 12, seed=seed)
        assert _greedy(model, prompt, 16) == _greedy(ref, prompt, 16), f"seed {seed}"


def test_published_bf16_layout_runs_like_its_exact_f32_widening(checkpoint, tmp_path):
    """A bf16 checkpoint (as mlx-community publishes) run with f32 activations gives mlx-lm's f32 logits of
    the same checkpoint widened to f32 (bf16 -> f32 is exact): f32 on a CPU loses nothing to the layout."""
    src = checkpoint("like-35b", "bfloat16")
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            arrays = {
                k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v for k, v in mx.load(str(f)).items()
            }
            mx.save_safetensors(str(wide / f.name), arrays, metadata={"format": "mlx"})
        else:
            shutil.copy(f, wide / f.name)
    ref = _reference(wide)
    model, args = load_model(src, dtype="float32")
    prompt = _prompt(args.vocab_size, 24, seed=2)
    assert _max_diff(model(prompt), ref(prompt)) < ATOL
    assert _greedy(model, prompt, 24) == _greedy(ref, prompt, 24)
