"""Hot set: the decode hit rate over the first 64 tokens with and without `--preload hot`.

    python benchmarks/bench_hot_set.py [--share 0.3] [--tokens 64] [--no-append]

On the shipped demo model (trained on the stdlib's source): a profile is made from a few stdlib modules
(`streamer profile`'s library function, teacher-forced), then the first tokens of a *held-out* text (this
repository's own sources, which the demo never saw) run through the engine with a cache of ``share`` of
all experts, the default policy, starting cold (`--preload none`) or hot (`--preload hot`). Two cases:
  first-64   the first 64 tokens fed one at a time as decode steps from an empty context (a chat's start);
  after-256  a 256-token prompt prefilled first (it warms a cold cache), then the next 64 decode steps.
Hit rates are runtime counters (hits / lookups over those decode steps); hit rates are deterministic, so
one run suffices. Also shown: the hot set chosen from the held-out text itself (the best a static hot
set can do on it) and the preload's own cost. Appends rows to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, row  # noqa: E402

from streamer.generation.generate import prefill
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.storage.profile_file import write_profile
from streamer.synthetic.demo import demo_packed
from streamer.tuning.profile import profile_texts

REPO = Path(__file__).resolve().parents[1]


def stdlib_files() -> list[Path]:
    import collections
    import json.decoder
    import os

    lib = Path(os.__file__).parent
    return [
        Path(collections.__file__),
        Path(json.decoder.__file__),
        lib / "functools.py",
        lib / "textwrap.py",
    ]


def held_out_text() -> str:
    files = ["streamer/experts/runtime.py", "streamer/experts/expert_cache.py", "streamer/loader.py"]
    return "".join((REPO / f).read_text() for f in files)


def cache_experts(packed: Path, share: float) -> int:
    layers = json.loads((packed / "manifest.json").read_text())["layers"]
    return int(share * sum(l["num_experts"] for l in layers))


def run(packed: Path, config: RuntimeConfig, ids: list[int], prompt: int, tokens: int) -> dict:
    start = time.perf_counter()
    with load_engine(packed, config) as engine:
        loaded = time.perf_counter() - start
        used = engine.runtime.cache.used_slots(0)
        cache = engine.model.make_cache()
        if prompt:
            mx.eval(prefill(engine.model, ids[:prompt], cache))
        before = engine.stats()
        for tok in ids[prompt : prompt + tokens]:
            mx.eval(engine.model(mx.array([[tok]]), cache=cache))
        after = engine.stats()
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    return {
        "hit_rate": hits / (hits + misses),
        "hits": hits,
        "misses": misses,
        "preloaded": used,
        "load_s": loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    packed = demo_packed()
    n = cache_experts(packed, args.share)
    work = Path(tempfile.mkdtemp(prefix="streamer-hot-set-"))
    held = work / "held_out.py"
    held.write_text(held_out_text())
    with load_engine(packed, RuntimeConfig(cache_experts=n)) as engine:
        start = time.perf_counter()
        profile = profile_texts(engine, stdlib_files())
        profile_s = time.perf_counter() - start
        oracle = profile_texts(engine, [held], max_tokens=256 + args.tokens)
        ids = engine.tokenizer.encode(held.read_text())
    write_profile(profile, work / "stdlib.json")
    write_profile(oracle, work / "oracle.json")
    sources = ", ".join(f"{s['name']} ({s['tokens']})" for s in profile.sources)
    print(f"profile: {profile.tokens} tokens of {sources} in {profile_s:.1f} s")

    rows, results = [], {}
    for case, prompt in (("first-64", 0), ("after-256", 256)):
        for label, preload, path in (
            ("none", "none", None),
            ("hot", "hot", work / "stdlib.json"),
            ("hot-oracle", "hot", work / "oracle.json"),
        ):
            config = RuntimeConfig(cache_experts=n, preload=preload, profile=str(path) if path else None)
            r = results[case, label] = run(packed, config, ids, prompt, args.tokens)
            print(
                f"{case:9s} --preload {label:10s} hit rate {r['hit_rate']:.3f} ({r['hits']} hits, "
                f"{r['misses']} misses; {r['preloaded']} experts cached at start, load {r['load_s']:.2f} s)"
            )
        base = results[case, "none"]["hit_rate"]
        for label in ("none", "hot", "hot-oracle"):
            r = results[case, label]
            note = (
                f"demo (64x top-8, 8 layers), cache {n} experts ({args.share:.0%}), policy lfu; held-out: "
                f"this repo's sources; {case}: "
                + ("64 tokens as decode steps from an empty context" if not prompt else
                   f"{prompt}-token prompt prefilled, then {args.tokens} decode steps")
                + f"; profile: {profile.tokens} stdlib tokens"
                + ("; oracle = profile of the held-out text itself" if label == "hot-oracle" else "")
                + f"; {r['hits']} hits {r['misses']} misses; ratio = vs --preload none"
            )  # fmt: skip
            rows.append(
                row(f"hot-set demo {case} preload={label}", "decode_hit_rate", r["hit_rate"],
                    r["hit_rate"] / base if base else "", note)
            )  # fmt: skip
    if not args.no_append:
        append_results(rows)
        print(f"appended {len(rows)} rows to benchmarks/results.tsv")


if __name__ == "__main__":
    main()
