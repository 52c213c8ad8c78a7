"""REAP saliency and `streamer prune`: the saliency equals a hand computation, the observer changes no
output, a pruned model holds exactly the chosen experts and router rows, bad counts are one-line errors,
an interrupted prune resumes to the same bytes, the exported checkpoint gives mlx-lm the engine's greedy
tokens, and a pruned model says so."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.generation.generate import prefill
from streamer.loader import load_engine
from streamer.models.args import ModelArgs
from streamer.models.load import load_model
from streamer.models.moe_block import SparseMoeBlock
from streamer.settings import RuntimeConfig
from streamer.storage.export import export_checkpoint
from streamer.storage.packed import open_packed
from streamer.storage.packed_format import MANIFEST_FILE
from streamer.storage.profile_file import REAP, ROUTED, empty_profile, read_profile, write_profile
from streamer.storage.prune import make_prune_plan, run_prune
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.session import model_identity
from streamer.synthetic.demo import demo_checkpoint
from streamer.synthetic.presets import get_preset
from streamer.synthetic.writer import generate
from streamer.tuning import profile as prof
from streamer.tuning.saliency import Saliency, choose_experts, keep_count

TOKENS = [(i * 37 + (i // 7) * 11) % 500 + 3 for i in range(40)]
STDLIB = Path(os.__file__).parent
F32 = RuntimeConfig(dtype="float32")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source checkpoint, packed dir) of the tiny preset: 4 layers, 16 experts top-4, float32."""
    root = tmp_path_factory.mktemp("prune-tiny")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return src, root / "packed"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("prune-demo") / "demo"
    run_repack(make_plan(demo_checkpoint(), dst))
    return dst


@pytest.fixture(autouse=True)
def _homes(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))


KEPT = [
    [0, 2, 3, 5, 7, 8, 11, 12, 13, 15],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    list(range(6, 16)),
    list(range(0, 16, 2)) + [1, 3],
]


# ---------------------------------------------------------------------------------------------------------
# Saliency.


def _block(norm: bool) -> SparseMoeBlock:
    args = ModelArgs.from_dict({**get_preset("tiny").text_config, "norm_topk_prob": norm})
    mx.random.seed(1)
    block = SparseMoeBlock(args)
    block.update({"gate": {"weight": mx.random.normal(block.gate.weight.shape) * 0.5}})
    mx.eval(block.parameters())
    return block


@pytest.mark.parametrize("norm", [True, False])
def test_saliency_equals_a_hand_computation(norm):
    """REAP by hand: per token, softmax router, top-k, gate weights (renormalised if the model says so),
    each chosen expert run alone, ||output||_2 in float64; mean per expert over its tokens."""
    block = _block(norm)
    E, K = block.gate.weight.shape[0], block.top_k
    x = np.random.default_rng(2).standard_normal((2, 6, block.gate.weight.shape[1])).astype(np.float32)
    sums, counts = np.zeros(E), np.zeros(E, np.int64)
    for t in x.reshape(-1, x.shape[-1]):
        xt = mx.array(t[None, None])
        logits = np.array(block.gate(xt)).reshape(-1).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:K]
        w = probs[chosen] / (probs[chosen].sum() if norm else 1.0)
        for wi, e in zip(w, chosen, strict=True):
            out = np.array(block.experts(xt, mx.array([[[int(e)]]])), np.float64)[0, 0, 0]
            sums[e] += wi * np.linalg.norm(out)
            counts[e] += 1
    want = np.divide(sums, counts, out=np.zeros(E), where=counts > 0)
    saliency = Saliency([E])
    block.set_observer(saliency, 0)
    mx.eval(block(mx.array(x)))
    np.testing.assert_array_equal(saliency.counts[0], counts)
    np.testing.assert_allclose(saliency.scores(0), want, rtol=1e-5, atol=1e-7)
    assert saliency.tokens == 12 and (want > 0).sum() > K  # several experts, some never routed


def _logits(model, tokens=TOKENS) -> np.ndarray:
    cache = model.make_cache()
    out = [np.array(model(mx.array([tokens[:24]]), cache=cache)[0])]
    for t in tokens[24:30]:
        out.append(np.array(model(mx.array([[t]]), cache=cache)[0]))
    return np.concatenate(out)


def test_observer_changes_no_output_and_streamed_equals_resident(tiny):
    src, packed = tiny
    model, _ = load_model(src, "float32")
    plain = _logits(model)
    observed = Saliency([16] * 4)
    observed.install(model)
    with_observer = _logits(model)
    Saliency.remove(model)
    assert all(layer.mlp.observer is None for layer in model.layers)
    np.testing.assert_array_equal(_logits(model), plain)  # off again: bitwise the same
    np.testing.assert_array_equal(with_observer, plain)  # the observer only reads
    with load_engine(packed, RuntimeConfig(dtype="float32", cache_experts=8)) as engine:
        streamed = Saliency([16] * 4)
        streamed.install(engine.model)
        np.testing.assert_array_equal(_logits(engine.model), plain)
    for layer in range(4):
        np.testing.assert_array_equal(streamed.counts[layer], observed.counts[layer])
        np.testing.assert_allclose(streamed.scores(layer), observed.scores(layer), rtol=1e-5)
    assert observed.counts[0].sum() == 30 * 4


def test_choose_experts_by_each_method():
    profile = empty_profile({"name": "m", "fingerprint": "f"}, [6], 2)
    profile.arrays[0][ROUTED] = [5, 9, 9, 1, 0, 7]
    profile.arrays[0][REAP] = [0.1, 0.2, 3.0, 2.0, 0.0, 0.2]
    assert choose_experts(profile, [6], 3, "reap") == [[1, 2, 3]]  # tie 0.2: the lower id
    assert choose_experts(profile, [6], 3, "frequency") == [[1, 2, 5]]
    a, b = choose_experts(None, [6], 3, "random", seed=1), choose_experts(None, [6], 3, "random", seed=1)
    assert a == b and len(a[0]) == 3 and a != choose_experts(None, [6], 3, "random", seed=2)
    del profile.arrays[0][REAP]
    with pytest.raises(Exception, match="no REAP scores"):
        choose_experts(profile, [6], 3, "reap")


def test_keep_count():
    assert keep_count(64, 8, None, 0.25) == 48 and keep_count(64, 8, None, 0.125) == 56
    assert keep_count(64, 8, 9, None) == 9


# ---------------------------------------------------------------------------------------------------------
# The pruned copy.


def _prune(packed, dst, kept=KEPT, **kw):
    return run_prune(make_prune_plan(open_packed(packed), dst, kept, {"method": "test"}), **kw)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp("pruned") / "out"
    assert _prune(tiny[1], dst).status == "packed"
    return dst


def test_prune_keeps_exactly_the_chosen_experts_and_router_rows(tiny, pruned):
    _, packed = tiny
    source, out = open_packed(packed), open_packed(pruned)
    for layer, ids in enumerate(KEPT):
        s, o = source.manifest.layers[layer], out.manifest.layers[layer]
        assert o.num_experts == len(ids) and o.block_bytes == s.block_bytes
        with open(packed / s.file, "rb") as fs, open(pruned / o.file, "rb") as fo:
            for j, e in enumerate(sorted(ids)):
                fs.seek(s.block_offset(e))
                fo.seek(o.block_offset(j))
                assert fo.read(o.block_bytes) == fs.read(s.block_bytes), (layer, j, e)
    a, b = mx.load(str(packed / "resident.safetensors")), mx.load(str(pruned / "resident.safetensors"))
    routers = [n for n in a if ".mlp.gate." in n]
    assert routers and set(a) == set(b)
    for name in a:
        if name in routers:
            layer = int(name.split(".layers.")[1].split(".")[0])
            np.testing.assert_array_equal(np.array(b[name]), np.array(a[name])[sorted(KEPT[layer])])
        else:
            assert np.array_equal(np.array(a[name]), np.array(b[name])), name
    config = json.loads((pruned / "config.json").read_text())
    assert (config.get("text_config") or config)["num_experts"] == 10
    assert out.manifest.pruned["experts"] == 10 and out.manifest.pruned["kept"] == [sorted(k) for k in KEPT]
    run = CliRunner().invoke(main, ["verify", str(pruned)])
    assert run.exit_code == 0, run.output


def _masked(gate, mask):
    return lambda x: gate(x) + mask


def test_pruned_model_runs_like_the_source_restricted_to_its_experts(tiny, pruned):
    """The pruned model = the source with the dropped experts' router logits at -inf."""
    src, _ = tiny
    model, _ = load_model(src, "float32")
    for layer, ids in zip(model.layers, KEPT, strict=True):
        gate, mask = layer.mlp.gate, np.full(16, -np.inf, np.float32)
        mask[ids] = 0
        layer.mlp.gate = _masked(gate, mx.array(mask))
    want = _logits(model)
    with load_engine(pruned, F32) as engine:
        np.testing.assert_allclose(_logits(engine.model), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 3])
def test_interrupted_prune_resumes_to_the_same_bytes(tiny, pruned, tmp_path, layer):
    dst = tmp_path / "out"

    def stop(i):
        if i == layer:
            raise Interrupt

    with pytest.raises(Interrupt):
        _prune(tiny[1], dst, after_layer=stop)
    assert not (dst / MANIFEST_FILE).exists()
    assert _prune(tiny[1], dst).status == "resumed"
    assert _tree(dst) == _tree(pruned)
    assert _prune(tiny[1], dst).status == "already packed"
    other = [KEPT[1], *KEPT[1:]]  # another choice of experts: not this destination's model
    with pytest.raises(Exception, match="another checkpoint"):
        _prune(tiny[1], dst, kept=other)


def test_damaged_pruned_copy_is_repaired(tiny, pruned, tmp_path):
    dst = tmp_path / "out"
    _prune(tiny[1], dst)
    layer = dst / open_packed(dst).manifest.layers[2].file
    raw = bytearray(layer.read_bytes())
    raw[-100] ^= 0xFF
    layer.write_bytes(bytes(raw))
    assert _prune(tiny[1], dst).status == "repaired"
    assert _tree(dst) == _tree(pruned)


def test_killed_prune_resumes(tiny, pruned, tmp_path):
    """SIGKILL in the middle of writing (after layer 1 is committed) leaves a directory that the same
    command completes."""
    import subprocess
    import sys

    dst = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from streamer.storage.packed import open_packed\n"
        "from streamer.storage.prune import make_prune_plan, run_prune\n"
        f"plan = make_prune_plan(open_packed({str(tiny[1])!r}), {str(dst)!r}, {KEPT!r},\n"
        "    {'method': 'test'})\n"
        "run_prune(plan, after_layer=lambda i: i == 1 and os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    assert not (dst / MANIFEST_FILE).exists() and (dst / "repack-progress.json").exists()
    assert _prune(tiny[1], dst).status == "resumed"
    assert _tree(dst) == _tree(pruned)


# ---------------------------------------------------------------------------------------------------------
# mlx-lm on the exported checkpoint.


def test_exported_checkpoint_gives_mlx_lm_the_engines_greedy_tokens(pruned, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.generate import generate_step

    out = export_checkpoint(open_packed(pruned), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.partial").exists()
    model, _ = mlx_lm.load(str(out))
    want = [
        int(t)
        for t, _ in generate_step(
            mx.array(TOKENS[:16]), model, max_tokens=16, sampler=lambda lp: mx.argmax(lp, axis=-1)
        )
    ]
    with load_engine(pruned, F32) as engine:
        cache = engine.model.make_cache()
        logits, got = prefill(engine.model, TOKENS[:16], cache), []
        for _ in range(16):
            got.append(int(mx.argmax(logits.reshape(-1))))
            logits = engine.model(mx.array([[got[-1]]]), cache=cache)[0, -1]
    assert got == want
    with pytest.raises(Exception, match="already exists"):
        export_checkpoint(open_packed(pruned), out)


# ---------------------------------------------------------------------------------------------------------
# The command, its errors and its labels.


def _cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--keep", "16"], "nothing to prune"),
        (["--keep", "3"], "keep at least 4"),
        (["--keep", "0"], "keep at least 4"),
        (["--ratio", "1.5"], "between 0 and 1"),
        (["--ratio", "0"], "between 0 and 1"),
        (["--ratio", "0.9"], "keeps 2 of 16 experts: a token routes to 4"),
        (["--ratio", "0.5", "--keep", "8"], "one of --ratio"),
        ([], "one of --ratio"),
        (["--keep", "8", "--by", "reap"], "no profile"),
        (["--keep", "8", "--by", "frequency", "--profile", "/nonexistent.json"], "no profile"),
    ],
)
def test_bad_counts_are_one_line_errors(tiny, tmp_path, flags, message):
    dst = tmp_path / "out"
    flags = flags if "--by" in flags else [*flags, "--by", "random"]
    result = _cli("prune", tiny[1], dst, *flags, "--no-divergence", ok=False)
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not dst.exists()


def test_prune_command_labels_and_divergence(demo, tmp_path):
    """On the trained demo: profile --reap, prune 25 % by REAP, divergence reported, labels everywhere."""
    prof_path = tmp_path / "p.json"
    _cli(
        "profile",
        demo,
        "--text",
        STDLIB / "json" / "decoder.py",
        "--reap",
        "--max-tokens",
        "600",
        "--out",
        prof_path,
    )
    profile = read_profile(prof_path)
    assert profile.sources[0]["reap"] and len(profile.arrays[0][REAP]) == 64
    dst = tmp_path / "pruned"
    out = _cli("prune", demo, dst, "--ratio", "0.25", "--profile", prof_path, "--heldout-tokens", "64").output
    assert "keeps 48 of 64 experts" in out and "top-1 agreement" in out and "loss" in out
    info = _cli("info", dst).output
    assert "pruned by reap: 48 of 64 experts per layer kept" in info and "pruned (reap, 48 experts)" in info
    from streamer.cli.chat import _ChatLoop
    from streamer.generation.sampling import SamplingParams
    from streamer.serve.openai_api import list_models

    with load_engine(dst, F32) as engine:
        session = types.SimpleNamespace(params=SamplingParams(), enable_thinking=False, engine=engine)
        assert "Pruned by reap: 48 of 64" in _ChatLoop._banner(types.SimpleNamespace(session=session))
        settings = types.SimpleNamespace(model_names=("pruned",))
        ctx = types.SimpleNamespace(settings=settings, worker=types.SimpleNamespace(engine=engine))
        entry = list_models(ctx, 0).body["data"][0]
        assert entry["pruned"]["method"] == "reap" and entry["pruned"]["experts"] == 48
    with load_engine(demo, F32) as engine:  # an unpruned model has no label
        ctx = types.SimpleNamespace(settings=settings, worker=types.SimpleNamespace(engine=engine))
        assert "pruned" not in list_models(ctx, 0).body["data"][0]
    assert "pruned" not in _cli("info", demo).output


def test_profile_reap_resumes_after_an_interrupted_file(demo, tmp_path):
    texts = [STDLIB / "json" / "decoder.py", STDLIB / "json" / "encoder.py"]
    with load_engine(demo, F32) as engine:
        whole = prof.profile_texts(engine, texts, max_tokens=900, reap=True)
        kept = []

        def stop(p):
            kept.append(json.loads(json.dumps(p.to_json())))
            raise Interrupt

        with pytest.raises(Interrupt):
            prof.profile_texts(engine, texts, max_tokens=900, reap=True, after_file=stop)
        partial = tmp_path / "p.json.progress"
        first = empty_profile(model_identity(demo), [64] * 8, 8)
        first.arrays = {e["layer"]: e["experts"] for e in kept[0]["layers"]}
        first.tokens, first.sources = kept[0]["tokens"], kept[0]["sources"]
        write_profile(first, partial)
        resumed = prof.profile_texts(engine, texts, max_tokens=900, reap=True, resume=read_profile(partial))
        with pytest.raises(Exception, match="other texts or options"):
            prof.profile_texts(engine, texts, max_tokens=900, reap=False, resume=read_profile(partial))
    assert resumed.tokens == whole.tokens and resumed.sources == whole.sources
    for layer in range(8):
        assert resumed.arrays[layer][ROUTED] == whole.arrays[layer][ROUTED]
        np.testing.assert_allclose(resumed.arrays[layer][REAP], whole.arrays[layer][REAP], rtol=1e-9)
