"""The demo model's corpus and tokenizer: Python source already on this machine, a small byte-level BPE.

Nothing is downloaded. Two sources (``SOURCES``):

- ``stdlib``: the standard library, ``sysconfig.get_paths()["stdlib"]`` (its ``site-packages`` and test
  suites left out);
- ``site-packages``: the installed third-party packages, ``sysconfig.get_paths()["purelib"]`` (in the venv:
  numpy, pip, pydantic, transformers, ...), at most ``PACKAGE_CHARS`` characters of each top-level package
  so no one package dominates, files over ``MAX_FILE_CHARS`` (generated tables) and this project's own
  editable-install shims left out. This repository's sources are never read: they are the held-out set of
  benchmarks/bench_demo_generalisation.py.

Files are split by a hash of their path relative to the source root: the same files are held out whatever
the Python version. Exact duplicates (by content) are kept once, and a training file whose text is also a
held-out file's is dropped.

Documents are joined with ``<|endoftext|>``. The tokenizer is a byte-level BPE trained on the training split
with Qwen3.5's pre-tokenizer regex, its 33 special tokens and its chat template, built as
``streamer.tokenizer_assets.make_small_tokenizer_json`` builds the tiny test vocabulary.
"""

from __future__ import annotations

import hashlib
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
SOURCES = ("stdlib", "site-packages")
PACKAGE_CHARS = 600_000  # per top-level third-party package (transformers alone has 53 MB)
MAX_FILE_CHARS = 100_000  # larger third-party files are mostly generated tables


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_root() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


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


def package_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(``site-packages/<relative path>``, path) of the third-party .py files used, sorted by name.

    Each top-level package contributes files in hash order (a spread over its modules, not its first
    directory) until it reaches ``PACKAGE_CHARS``.
    """
    root = Path(root) if root is not None else site_packages_root()
    budget: dict[str, int] = {}
    out = []
    files = source_files(root)
    for rel, path in sorted(files, key=lambda f: zlib.crc32(f[0].encode())):
        top = rel.split("/")[0]
        if top.startswith("__editable__") or top.startswith("streamer"):
            continue  # this project's editable-install shims: the held-out repository, not training text
        size = path.stat().st_size
        if size > MAX_FILE_CHARS or budget.get(top, 0) + size > PACKAGE_CHARS:
            continue
        budget[top] = budget.get(top, 0) + size
        out.append((f"site-packages/{rel}", path))
    return sorted(out)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a handful of files declare another encoding; skipping them keeps decoding simple


def read_corpus(
    root: Path | None = None,
    held_out_every: int = 32,
    max_chars: int | None = None,
    splits: tuple[str, ...] = ("train", "held_out"),
    sources: tuple[str, ...] = ("stdlib",),
) -> Corpus:
    """Reads the sources' .py files and splits them into training and held-out documents.

    Args:
        root: the stdlib directory to read (default: this Python's stdlib).
        held_out_every: hold out one file in this many (by path hash).
        max_chars: stop adding files to a split once it holds this many characters (tiny test runs).
        splits: the splits to read (the others stay empty).
        sources: which of ``SOURCES`` to read, in this order.

    Raises:
        FileNotFoundError: no usable source file for a split that was asked for.
        ValueError: an unknown source.
    """
    if unknown := set(sources) - set(SOURCES):
        raise ValueError(f"unknown corpus sources {sorted(unknown)}; choose from {SOURCES}")
    files = source_files(root) if "stdlib" in sources else []
    files += package_files() if "site-packages" in sources else []
    by_split: dict[str, dict[str, tuple[str, str]]] = {"train": {}, "held_out": {}}  # digest -> (rel, text)
    for rel, path in files:
        split = "held_out" if is_held_out(rel, held_out_every) else "train"
        if split not in splits or (max_chars is not None and _chars(by_split[split]) >= max_chars):
            continue
        text = read_text(path)
        if text and text.strip():
            by_split[split].setdefault(hashlib.sha256(text.encode()).hexdigest(), (rel, text))
    for digest in set(by_split["train"]) & set(by_split["held_out"]):
        del by_split["train"][digest]  # the same text on both sides would leak the held-out set
    texts = {k: [t for _, t in v.values()] for k, v in by_split.items()}
    names = {k: [r for r, _ in v.values()] for k, v in by_split.items()}
    for split in splits:
        if not texts[split]:
            raise FileNotFoundError(
                f"{root or stdlib_root()}: no usable .py file for the {split} split "
                "(is this a Python standard library directory?)"
            )
    return Corpus(texts["train"], texts["held_out"], names["train"], names["held_out"])


def _chars(docs: dict[str, tuple[str, str]]) -> int:
    return sum(len(t) for _, t in docs.values())


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
