"""The demo model's corpus and tokenizer: the Python standard library's own source, a small byte-level BPE.

Every machine with Python has the corpus, so nothing is downloaded. Files are listed in sorted order from
``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` and the stdlib's test suites left out)
and split by a hash of their relative path: the same files are held out whatever the Python version.

Documents are joined with ``<|endoftext|>``. The tokenizer is a byte-level BPE trained on the training split
with Qwen3.5's pre-tokenizer regex, its 33 special tokens and its chat template, built as
``streamer.tokenizer_assets.make_small_tokenizer_json`` builds the tiny test vocabulary.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.text.tokenizer_assets import (
    QWEN3_5_SPECIAL_TOKENS,
    QWEN3_5_TOKENIZER_CONFIG,
    qwen3_5_chat_template,
    train_qwen_bpe,
)

# Directory names never read: third-party code, and test suites (17 MB of fixtures and odd encodings).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
SEPARATOR = "<|endoftext|>"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str, held_out_every: int) -> bool:
    """One file in ``held_out_every``, chosen by a CRC-32 of its path relative to the stdlib root."""
    return zlib.crc32(relpath.encode()) % held_out_every == 0


@dataclass(frozen=True)
class Corpus:
    """Training and held-out documents (file texts), each list in sorted path order."""

    train: list[str]
    held_out: list[str]
    train_names: list[str]
    held_out_names: list[str]

    def summary(self) -> dict:
        return {
            "train_files": len(self.train),
            "train_chars": sum(map(len, self.train)),
            "held_out_files": len(self.held_out),
            "held_out_chars": sum(map(len, self.held_out)),
        }


def source_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(path relative to ``root``, path) of every .py file used, sorted, excluded directories left out."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            out.append((rel.as_posix(), path))
    return out


def read_corpus(
    root: Path | None = None,
    held_out_every: int = 32,
    max_chars: int | None = None,
    splits: tuple[str, ...] = ("train", "held_out"),
) -> Corpus:
    """Reads the stdlib's .py files and splits them into training and held-out documents.

    Args:
        root: the directory to read (default: this Python's stdlib).
        held_out_every: hold out one file in this many (by path hash).
        max_chars: stop adding files to a split once it holds this many characters (tiny test runs).
        splits: the splits to read (the others stay empty).

    Raises:
        FileNotFoundError: no usable source file for a split that was asked for.
    """
    texts: dict[str, list[str]] = {"train": [], "held_out": []}
    names: dict[str, list[str]] = {"train": [], "held_out": []}
    for rel, path in source_files(root):
        split = "held_out" if is_held_out(rel, held_out_every) else "train"
        if split not in splits or (max_chars is not None and sum(map(len, texts[split])) >= max_chars):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files declare another encoding; skipping them keeps decoding simple
        if text.strip():
            texts[split].append(text)
            names[split].append(rel)
    for split in splits:
        if not texts[split]:
            raise FileNotFoundError(
                f"{root or stdlib_root()}: no usable .py file for the {split} split "
                "(is this a Python standard library directory?)"
            )
    return Corpus(texts["train"], texts["held_out"], names["train"], names["held_out"])


def train_tokenizer(texts: list[str], vocab_tokens: int):
    """A byte-level BPE of ``vocab_tokens`` tokens in all, the Qwen3.5 special tokens last.

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    return train_qwen_bpe(texts, vocab_tokens - len(QWEN3_5_SPECIAL_TOKENS))


def write_tokenizer_dir(tok, dst: Path) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as Qwen3.5 checkpoints ship them."""
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "chat_template.jinja").write_text(qwen3_5_chat_template(), encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(QWEN3_5_TOKENIZER_CONFIG, indent=2) + "\n")
    return dst


def encode_documents(tok, texts: list[str]) -> np.ndarray:
    """All documents as one uint16 token stream, each followed by ``<|endoftext|>``."""
    sep = tok.token_to_id(SEPARATOR)
    assert tok.get_vocab_size(with_added_tokens=True) <= 1 << 16
    pieces = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        pieces += [np.asarray(enc.ids, dtype=np.uint16), np.asarray([sep], dtype=np.uint16)]
    return np.concatenate(pieces)
