"""Peak memory while decoding stays within resident weights + the expert cache budget + a stated margin.

The model has 453 MB of experts; the cache gets 48 MB. A fresh process imports everything, notes its
peak RSS (the interpreter and libraries: the baseline), loads the model, decodes, and reports its peak
RSS over its whole life and over decoding alone (Linux: VmHWM, reset through /proc/self/clear_refs).

MARGIN_BYTES (96 MB; 60-70 MB measured on Linux/CPU) is what is neither weights nor cache:
- MLX temporaries of a step and MLX's cache of freed buffers: a 37-token prefill chunk routes to up to
  128 experts per layer, run in slot-sized batches (~20 MB of temporaries, ~35 MB kept by the allocator);
- the tokenizer, the model's Python objects, reader-thread stacks (~10 MB).
It does not grow with the model's expert bytes or with the bytes streamed: the test also checks that
decoding on after more than the whole model has been read through the cache adds (almost) nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.presets import Preset, _text_config
from streamer.synthetic.writer import generate

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

CACHE_BYTES = 48 * 10**6
MARGIN_BYTES = 96 * 10**6
GROWTH_BYTES = 16 * 10**6  # allowed RSS growth while decoding on (allocator noise, not a leak)

# 4 layers of 128 experts top-10 at hidden 1024 / expert intermediate 512: 0.88 MB per expert block.
BIG_EXPERTS = Preset(
    "memory-bound",
    "453 MB of experts behind a small resident part",
    _text_config(
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_value_heads=8,
        linear_num_key_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=128,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
    values="codes",
)

PROBE = """
import json, resource, sys

def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def hwm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

from streamer.settings import RuntimeConfig
from streamer.loader import load_engine
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler

baseline = peak_bytes()
engine = load_engine(sys.argv[1], RuntimeConfig(cache_bytes=int(sys.argv[2])))
loaded = peak_bytes()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM: from here on it is the peak of decoding alone
sampler = make_sampler(SamplingParams())
stream = stream_generate(engine.model, engine.tokenizer, list(range(3, 40)), sampler, 24)
marks = []
for n, _ in enumerate(stream, 1):
    if n in (4, 24):
        marks.append({"hwm": hwm_bytes(), "bytes_read": engine.stats()["bytes_read"]})
m = engine.runtime.packed.manifest
print(json.dumps({
    "baseline": baseline, "loaded": loaded, "peak": peak_bytes(), "marks": marks,
    "resident_bytes": m.resident_bytes, "expert_bytes": m.expert_bytes,
    "cache_bytes": engine.runtime.cache.capacity_bytes,
}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    src = generate(root / "src", BIG_EXPERTS)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


def test_decode_peak_rss_within_weights_cache_and_margin(big_model):
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(big_model), str(CACHE_BYTES)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    bound = r["resident_bytes"] + r["cache_bytes"] + MARGIN_BYTES
    assert r["cache_bytes"] <= CACHE_BYTES and bound < r["expert_bytes"]  # holding the experts would fail
    first, last = r["marks"]
    report = {k: (v / 1e6 if isinstance(v, int) else v) for k, v in r.items() if k != "marks"}
    # The whole process (load included) and decoding alone, above the interpreter + libraries baseline.
    assert r["peak"] - r["baseline"] <= bound, report
    assert last["hwm"] - r["baseline"] <= bound, report
    # Decoding on while more than the whole model streams through the cache adds no memory.
    assert last["bytes_read"] - first["bytes_read"] > r["expert_bytes"], (first, last)
    assert last["hwm"] - first["hwm"] <= GROWTH_BYTES, (first, last)
