"""The repack CLI: hub ids from the local cache, the data dir, dry run, list and info."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.errors import PackedFormatError
from streamer.storage import paths
from tests.repack.helpers import (
    Interrupt,
    _assert_reproduces,
    _interrupt_after_layer,
    _repack,
)

# ----------------------------------------------------------------------------------------------------
# CLI: hub ids, data dir, dry run, list, info.


def _fake_hub_cache(src: Path, hub: Path, repo_id: str) -> None:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")


def test_cli_repack_by_hub_id_then_list_info_and_resolve(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(sources("reap"), tmp_path / "hub", "test-org/Reap-Model")
    runner = CliRunner()

    with pytest.raises(PackedFormatError, match='run "streamer repack test-org/Reap-Model" first'):
        paths.resolve_packed_model("test-org/Reap-Model")
    dry = runner.invoke(main, ["repack", "test-org/Reap-Model", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "54 experts × 16,384 B blocks" in dry.output and "[new]" in dry.output
    assert not (tmp_path / "home").exists()

    result = runner.invoke(main, ["repack", "test-org/Reap-Model"])
    assert result.exit_code == 0, result.output
    packed_dir = tmp_path / "home" / "models" / "test-org--Reap-Model"
    assert paths.resolve_packed_model("test-org/Reap-Model") == packed_dir
    _assert_reproduces(sources("reap"), packed_dir)

    listing = runner.invoke(main, ["list"])
    assert listing.exit_code == 0 and "test-org/Reap-Model" in listing.output and "MB" in listing.output
    info = runner.invoke(main, ["info", "test-org/Reap-Model"])
    assert info.exit_code == 0, info.output
    assert "experts 54" in info.output and "resident" in info.output and "streamed from disk" in info.output
    assert runner.invoke(main, ["verify", "test-org/Reap-Model"]).exit_code == 0
    again = runner.invoke(main, ["repack", "test-org/Reap-Model"])
    assert again.exit_code == 0 and "already packed" in again.output


def test_list_shows_interrupted_repacks(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    src = sources("tiny")
    with pytest.raises(Interrupt):
        _repack(src, paths.default_packed_dir(src), after_layer=_interrupt_after_layer(1))
    listing = CliRunner().invoke(main, ["list"])
    assert "incomplete" in listing.output
    with pytest.raises(PackedFormatError, match="interrupted"):
        paths.resolve_packed_model(str(src))
    _repack(src, paths.default_packed_dir(src))
    assert paths.resolve_packed_model(str(src)) == paths.default_packed_dir(src)


def test_data_dir_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "sh"))
    assert paths.data_dir() == tmp_path / "sh"
    monkeypatch.delenv("STREAMER_HOME")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.data_dir() == tmp_path / "xdg" / "streamer"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert paths.data_dir() == Path.home() / ".local" / "share" / "streamer"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert paths.data_dir() == Path.home() / "Library" / "Application Support" / "streamer"
    assert paths.models_dir().name == "models"
    assert paths.default_packed_dir("mlx-community/Qwen3.5-397B-A17B-4bit").name == (
        "mlx-community--Qwen3.5-397B-A17B-4bit"
    )
