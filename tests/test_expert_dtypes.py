"""Every dtype a checkpoint's experts can have: slots hold what the kernels compute in, logits stay exact.

``mx.gather_qmm`` / ``mx.gather_mm`` convert scales, biases (or unquantized weights) whose dtype differs
from ``mx.result_type(x, scales)`` for the whole array on every call, so a pool held as stored (bf16
scales, f32 activations) costs time in proportion to its slots. Timing is not asserted here (see
benchmarks/bench_experts_call.py); these tests pin the cause instead: every float array the experts
compute with, streamed slot pools and resident stacks alike, is already in the promoted dtype. And the
conversion must not change a bit: streamed logits equal resident ones at the smallest cache and with
every expert cached, where decode runs as one lazy graph per token (no host round trip per layer).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from streamer.experts.budget import minimum_cache_bytes
from streamer.experts.expert_cache import _STORAGE, SlotPool, block_shape
from streamer.loader import load_engine
from streamer.models.args import ModelArgs
from streamer.settings import RuntimeConfig
from streamer.storage.packed import open_packed
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.presets import Preset, _default_recipe, _text_config
from streamer.synthetic.writer import generate

PROMPT = [5, 77, 301, 12, 9, 44, 500, 3]
F32, BF16 = mx.float32, mx.bfloat16
_DEFAULT = _default_recipe()


def _unquantized_experts(path: str) -> dict | None:
    return None if ".switch_mlp." in path else _DEFAULT(path)


# Unquantized routed experts (as some dynamic recipes leave small models): gather_mm over float pools.
UNQUANTIZED = Preset(
    "unquantized", "tiny with unquantized experts", _text_config(), recipe=_unquantized_experts
)
PRESETS = {"tiny": "tiny", "mixed": "mixed", "q8": "q8", "unquantized": UNQUANTIZED}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    built = {}

    def get(preset: str, dtype: str):
        if (preset, dtype) not in built:
            src = generate(root / f"{preset}-{dtype}-src", PRESETS[preset], dtype=dtype, seed=5)
            run_repack(make_plan(src, root / f"{preset}-{dtype}-packed"))
            built[preset, dtype] = (src, root / f"{preset}-{dtype}-packed")
        return built[preset, dtype]

    return get


def _logits(engine, steps: int = 6) -> list[np.ndarray]:
    cache = engine.model.make_cache()
    logits = engine.model(mx.array([PROMPT]), cache=cache)
    out = [np.array(logits[0].astype(F32))]
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        logits = engine.model(mx.array([[token]]), cache=cache)
        out.append(np.array(logits[0].astype(F32)))
    return out


CASES = [(p, d, "float32") for p in PRESETS for d in ("bfloat16", "float32")] + [
    ("tiny", "bfloat16", "bfloat16"),  # bf16 activations with bf16 scales: held as stored
    ("tiny", "float32", "bfloat16"),  # bf16 activations with f32 scales: held f32, never narrowed
]


@pytest.mark.parametrize("preset, stored, activation", CASES)
def test_streamed_equals_resident_for_every_dtype(packed, preset, stored, activation):
    src, dst = packed(preset, stored)
    with load_engine(src, RuntimeConfig(dtype=activation), resident=True) as engine:
        want = _logits(engine)
    args = ModelArgs.from_dict(json.loads((dst / "config.json").read_text()))
    minimum = minimum_cache_bytes(open_packed(dst), args, getattr(mx, activation))
    every = args.num_experts * args.num_hidden_layers
    for size, config in (
        ("min", RuntimeConfig(dtype=activation, cache_bytes=minimum)),
        ("all", RuntimeConfig(dtype=activation, cache_experts=every)),
        ("preloaded", RuntimeConfig(dtype=activation, cache_experts=every)),
    ):
        with load_engine(dst, config) as engine:
            if size == "preloaded":
                assert engine.runtime.preload() == every
                assert engine.runtime.all_cached()
            got = _logits(engine)
            stats = engine.stats()
        for step, (g, w) in enumerate(zip(got, want, strict=True)):
            assert np.array_equal(g, w), f"{preset} {stored}/{activation} cache={size}: step {step} differs"
        if size == "preloaded":
            assert stats["cache_misses"] == 0 and stats["cache_hits"] > 0
        else:
            assert stats["cache_misses"] > 0


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
@pytest.mark.parametrize("activation", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny", "unquantized"])
def test_experts_compute_with_arrays_already_in_the_promoted_dtype(packed, preset, stored, activation):
    """No per-call conversion of a whole pool (or a resident stack) can happen: the structural form of
    "a bigger cache is never slower"."""
    src, dst = packed(preset, stored)
    act = getattr(mx, activation)
    no_cpu_kernel = preset == "unquantized" and stored == activation == "bfloat16"  # bf16 gather_mm
    with load_engine(dst, RuntimeConfig(dtype=activation, cache_experts=64)) as engine:
        if not no_cpu_kernel:
            _logits(engine, steps=1)
        stored_dtypes = {c.name: c.dtype for c in open_packed(dst).manifest.layers[0].components}
        floats = 0
        for name, arr in engine.runtime.cache.pool(0).arrays.items():
            want = mx.result_type(act, _STORAGE[stored_dtypes[name]][1])
            if mx.issubdtype(arr.dtype, mx.floating):
                floats += 1
                assert arr.dtype == want, f"slot pool {name} is {arr.dtype}, the kernels compute in {want}"
        assert floats > 0
    if no_cpu_kernel:
        return
    with load_engine(src, RuntimeConfig(dtype=activation), resident=True) as engine:
        experts = engine.model.layers[0].mlp.experts
        for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
            for name in ("weight", "scales", "biases"):
                arr = getattr(proj, name, None)
                if arr is not None and mx.issubdtype(arr.dtype, mx.floating):
                    assert arr.dtype == mx.result_type(act, getattr(mx, stored)), (name, arr.dtype)


@pytest.mark.parametrize("stored", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("activation", [F32, BF16, mx.float16])
def test_a_read_widens_exactly(stored, activation):
    """The reader's numpy widening equals MLX's own conversion bit for bit (incl. inf, nan, subnormals)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=4096, dtype=np.uint16)
    raw = bits.tobytes() if stored != "F32" else rng.standard_normal(4096).astype(np.float32).tobytes()
    shape = block_shape([("scales", stored, (len(raw) // (2 if stored != "F32" else 4),))], activation)
    pool = SlotPool(shape, 2)
    held = shape.components[0].slot_dtype
    assert pool.arrays["scales"].dtype == mx.result_type(activation, _STORAGE[stored][1])

    def fill(buffers):
        buffers[0][:] = raw
        return len(raw)

    assert pool.buffers(1).read(fill) == len(raw)
    storage, real = _STORAGE[stored]
    want = mx.array(np.frombuffer(raw, dtype=np.dtype(str(storage).split(".")[-1]))).view(real)
    want = want.astype(_STORAGE[held][1])
    got = np.array(pool.arrays["scales"][1].view(_STORAGE[held][0]))
    want_bits = np.array(want.view(_STORAGE[held][0]))
    nan = np.isnan(np.array(want.astype(F32)))  # MLX quiets signalling NaNs, numpy keeps them: NaN either way
    assert np.array_equal(np.isnan(np.array(pool.arrays["scales"][1].astype(F32))), nan)
    assert np.array_equal(got[~nan], want_bits[~nan])


def test_every_expert_cached_decodes_without_the_host_path(packed):
    """With all experts in slots, a token is one lazy graph: the per-layer host round trip (routing ids
    to the host, pin, evaluate, unpin) is never taken, and hits are still counted."""
    _, dst = packed("tiny", "bfloat16")
    args = ModelArgs.from_dict(json.loads((dst / "config.json").read_text()))
    with load_engine(dst, RuntimeConfig(cache_experts=10_000)) as engine:
        engine.runtime.preload()
        rt = engine.runtime

        def host_path(*a, **k):
            raise AssertionError("host round trip taken with every expert cached")

        rt.begin = host_path
        cache = engine.model.make_cache()
        engine.model(mx.array([PROMPT]), cache=cache)
        before = engine.stats()["cache_hits"]
        mx.eval(engine.model(mx.array([[7]]), cache=cache))
        assert engine.stats()["cache_hits"] - before == args.num_experts_per_tok * args.num_hidden_layers
        assert rt.cache.pinned_count() == 0
        # --trace needs the ids on the host: it takes the host path (here: the patched one).
        rt.on_route = lambda layer, ids: None
        with pytest.raises(AssertionError, match="host round trip"):
            engine.model(mx.array([[7]]), cache=cache)


def test_a_partly_filled_cache_takes_the_host_path(packed):
    _, dst = packed("tiny", "bfloat16")
    with load_engine(dst, RuntimeConfig(cache_experts=10_000)) as engine:
        assert not engine.runtime.all_cached()  # nothing read yet: misses must go through the readers
        _logits(engine, steps=1)
        assert engine.stats()["cache_misses"] > 0
