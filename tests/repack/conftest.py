"""Fixtures of the repack tests: synthetic mlx-community sources with small shards (built once per
session, read only), an uninterrupted reference repack, and a fresh packed copy to damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.synthetic.writer import generate
from tests.repack.helpers import (
    SHARD_BYTES,
    _repack,
    _tree,
)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Builds each preset once per module: {name: checkpoint dir}."""
    root = tmp_path_factory.mktemp("src")
    built = {}

    def get(name: str, dtype: str = "bfloat16") -> Path:
        key = f"{name}-{dtype}"
        if key not in built:
            built[key] = generate(root / key, name, dtype=dtype, max_shard_bytes=SHARD_BYTES)
        return built[key]

    return get


@pytest.fixture
def small_groups(monkeypatch):
    """Groups of 4 experts, so that progress (and interruptions) happen many times inside a layer."""
    monkeypatch.setattr("streamer.storage.repack.GROUP_BYTES", 4 * 16384)


@pytest.fixture(scope="session")
def reference(sources, tmp_path_factory):
    """An uninterrupted repack of like-35b: (source, its packed tree)."""
    src = sources("like-35b")
    dst = tmp_path_factory.mktemp("ref") / "out"
    _repack(src, dst)
    return src, _tree(dst)


@pytest.fixture
def packed(sources, tmp_path):
    dst = tmp_path / "out"
    _repack(sources("tiny"), dst)
    return dst
