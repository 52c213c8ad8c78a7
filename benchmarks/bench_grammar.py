"""Per-token cost of constrained decoding: llguidance vs xgrammar on the real Qwen3.5 vocabulary, side by side.

    python benchmarks/bench_grammar.py            # needs both libraries importable (xgrammar needs torch)

xgrammar imports torch (and on Linux pip resolves the CUDA build: ~5.7 GB), so it is not in the project's
venv; run this from a separate one that has both, with the repository on the path:

    python -m venv /tmp/gbench && /tmp/gbench/bin/pip install xgrammar llguidance "mlx[cpu]" lz4 \
        tokenizers numpy jinja2 cachetools click
    PYTHONPATH=. /tmp/gbench/bin/python benchmarks/bench_grammar.py

For each workload (a JSON schema with nested objects, arrays and enums; any JSON object) the same valid
document, tokenized by the real Qwen3.5 tokenizer (248,077 ids), is walked token by token: compute the
next-token bitmask, then advance the matcher with the document's token (what a constrained sampler does
each step). Reported: mean (and median) microseconds per token for each library (ratio xgrammar / llguidance), the
grammar compile time per request, the one-time tokenizer setup, and what applying a mask to [V] logits
costs in MLX (shared by both). Runs alternate between the libraries; the best of ``--rounds`` is kept.
Appends rows to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import append_results, row  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city"],
        },
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "role": "admin",
    "tags": ["mathematics", "engines", "poetry of science", "notes"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "scores": [9.5, 8.25, 10, 7.75],
    "active": True,
}


def vocabulary():
    """The real Qwen3.5 tokenizer JSON, its encoded vocabulary in id order, and its end ids."""
    from tokenizers import Tokenizer

    from streamer.text.tokenizer_assets import qwen3_5_tokenizer_json

    text = qwen3_5_tokenizer_json()
    tok = Tokenizer.from_str(text)
    size = tok.get_vocab_size(with_added_tokens=True)
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    encoded = [by_id.get(i, "") for i in range(size)]
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return text, tok, encoded, eos


class Llguidance:
    name = "llguidance"

    def __init__(self, text: str, size: int, eos: list[int]):
        import llguidance as llg
        import numpy as np

        self.llg, self.np = llg, np
        self.tokenizer = llg.LLTokenizer(text, n_vocab=size, eos_token=eos)
        self.mask = np.zeros((size + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict | None):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema or {"type": "object"}, defaults={"whitespace_flexible": True}
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def step(self, matcher, token: int) -> None:
        matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        assert (self.mask[token // 32] >> (token % 32)) & 1, "the document's token was masked out"
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, encoded: list[str], size: int, eos: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=size, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, size)

    def compile(self, schema: dict | None):
        if schema is None:
            compiled = self.compiler.compile_builtin_json_grammar()
        else:
            compiled = self.compiler.compile_json_schema(json.dumps(schema))
        return self.xgr.GrammarMatcher(compiled)

    def step(self, matcher, token: int) -> None:
        matcher.fill_next_token_bitmask(self.mask)
        assert (int(self.mask[0, token // 32]) >> (token % 32)) & 1, "the document's token was masked out"
        assert matcher.accept_token(token)


def walk(lib, schema: dict | None, tokens: list[int]) -> tuple[float, float, float]:
    """(compile seconds, mean and median seconds per token) for one constrained pass over ``tokens``."""
    t0 = time.perf_counter()
    matcher = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    per_token = []
    for token in tokens:
        t = time.perf_counter()
        lib.step(matcher, token)
        per_token.append(time.perf_counter() - t)
    return compile_s, statistics.mean(per_token), statistics.median(per_token)


def mlx_apply_s(size: int, reps: int = 50) -> float:
    """Seconds to unpack a bitmask and set the masked logits of [V] float32 to -inf in MLX, as
    ``ConstrainedSampler.mask`` does (numpy unpacks the bits, ``mx.where`` applies them)."""
    import mlx.core as mx
    import numpy as np

    words = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, (size + 31) // 32, dtype=np.int32)
    logits = mx.random.normal((size,))
    mx.eval(logits)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)[:size]
        out = mx.where(mx.array(allowed), logits, -mx.inf)
        mx.eval(out)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print, do not append to results.tsv")
    args = p.parse_args(argv)

    text, tok, encoded, eos = vocabulary()
    size = len(encoded)
    setup = {}
    t = time.perf_counter()
    libs = [Llguidance(text, size, eos)]
    setup["llguidance"] = time.perf_counter() - t
    t = time.perf_counter()
    libs.append(Xgrammar(encoded, size, eos))
    setup["xgrammar"] = time.perf_counter() - t

    workloads = {
        "json_schema (8 fields, nested object, arrays, enum)": (SCHEMA, json.dumps(DOCUMENT, indent=2)),
        "json_object (any object)": (None, json.dumps(DOCUMENT)),
    }
    rows = []
    for label, (schema, document) in workloads.items():
        tokens = tok.encode(document, add_special_tokens=False).ids + [eos[0]]
        best = {lib.name: (float("inf"),) * 3 for lib in libs}
        for _ in range(args.rounds):
            for lib in libs:  # alternated, so load changes hit both
                result = walk(lib, schema, tokens)
                best[lib.name] = tuple(map(min, best[lib.name], result))
        llg_s, xgr_s = best["llguidance"][1], best["xgrammar"][1]
        llg_med, xgr_med = best["llguidance"][2], best["xgrammar"][2]
        config = f"Qwen3.5 vocabulary ({size} ids), {label}, {len(tokens)} tokens"
        note = (
            f"mean per token, mask + advance; xgrammar {xgr_s * 1e6:.1f} us; medians {llg_med * 1e6:.1f} / "
            f"{xgr_med * 1e6:.1f} us; best of {args.rounds} alternated; "
            f"compile per request llguidance {best['llguidance'][0] * 1e3:.1f} ms, "
            f"xgrammar {best['xgrammar'][0] * 1e3:.1f} ms"
        )
        rows.append(
            row(
                config,
                "grammar mask us/token llguidance (ratio xgrammar/llguidance)",
                llg_s * 1e6,
                xgr_s / llg_s,
                note,
            )
        )
        print(
            f"{label}: mean llguidance {llg_s * 1e6:.1f} us/token, xgrammar {xgr_s * 1e6:.1f} us/token, "
            f"ratio {xgr_s / llg_s:.2f}; compile {best['llguidance'][0] * 1e3:.1f} / "
            f"{best['xgrammar'][0] * 1e3:.1f} ms"
        )
    apply_s = mlx_apply_s(size)
    note = (
        f"tokenizer setup once per server: llguidance {setup['llguidance']:.2f} s, "
        f"xgrammar {setup['xgrammar']:.2f} s; applying a mask to [V] f32 logits in MLX (both): "
        f"{apply_s * 1e6:.0f} us"
    )
    rows.append(
        row(
            f"Qwen3.5 vocabulary ({size} ids)",
            "grammar tokenizer setup s llguidance (ratio xgrammar/llguidance)",
            setup["llguidance"],
            setup["xgrammar"] / setup["llguidance"],
            note,
        )
    )
    print(note)
    if not args.no_write:
        append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
