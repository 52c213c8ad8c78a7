"""Bad repack input is a clear error and leaves nothing that looks complete."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.errors import CheckpointError
from streamer.storage.packed_format import MANIFEST_FILE
from streamer.storage.repack_plan import DestinationError, make_plan
from tests.repack.helpers import (
    Interrupt,
    _interrupt_after_layer,
    _repack,
    _save_checkpoint,
    _tree,
)

# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing that looks complete.


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _bad_missing_shard(src):
    next(iter(sorted(src.glob("model-*.safetensors")))).unlink()


def _bad_truncated_shard(src):
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)


def _bad_index(src):
    shard = sorted(src.glob("model-*.safetensors"))[0].name
    _edit_json(
        src / "model.safetensors.index.json", lambda d: d["weight_map"].update({"extra.weight": shard})
    )


def _bad_model_type(src):
    _edit_json(src / "config.json", lambda d: d.update(model_type="llama"))


def _not_a_checkpoint(src):
    for p in src.iterdir():
        p.unlink()
    (src / "notes.txt").write_text("hello")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_missing_shard, r"shard model-00001-of-\d+.safetensors named in .* is missing"),
        (_bad_truncated_shard, "truncated"),
        (_bad_index, "places tensor 'extra.weight'"),
        (_bad_model_type, "unsupported model_type 'llama'"),
        (_not_a_checkpoint, "not a checkpoint"),
    ],
    ids=[
        "missing-shard",
        "truncated-shard",
        "index-names-missing-tensor",
        "unknown-model-type",
        "not-checkpoint",
    ],
)
def test_bad_source_is_a_clear_error(sources, tmp_path, damage, message):
    src = _copy(sources("tiny"), tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    damage(src)
    with pytest.raises(CheckpointError, match=message):
        make_plan(src, tmp_path / "out")
    result = CliRunner().invoke(main, ["repack", str(src), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.update(
                {
                    "language_model.model.layers.0.mlp.switch_mlp.up_proj.weight": mx.zeros(
                        (16, 64, 16), mx.int32
                    )
                }
            ),
            "unexpected dtype I32",
        ),
        (
            lambda t: t.update(
                {
                    "language_model.model.layers.2.mlp.switch_mlp.gate_proj.weight": mx.zeros(
                        (16, 32, 16), mx.uint32
                    )
                }
            ),
            r"gate_proj.weight' has shape \[16, 32, 16\], expected \[experts, 64, ...\]",
        ),
        (
            lambda t: t.update(
                {
                    "language_model.model.layers.2.mlp.switch_mlp.down_proj.scales": mx.zeros(
                        (16, 128, 3), mx.bfloat16
                    )
                }
            ),
            "cannot infer quantization of '.*down_proj' from shapes",
        ),
        (
            lambda t: t.pop("language_model.model.layers.3.mlp.switch_mlp.gate_proj.biases"),
            "gate_proj.biases' is missing",
        ),
        (lambda t: t.pop("language_model.model.layers.1.linear_attn.A_log"), "A_log' is missing"),
    ],
    ids=["dtype", "shape", "scales-shape", "missing-expert-component", "missing-resident"],
)
def test_unexpected_tensors_are_clear_errors(sources, tmp_path, edit, message):
    src = _save_checkpoint(sources("tiny"), tmp_path / "src", edit)
    with pytest.raises(CheckpointError, match=message):
        make_plan(src, tmp_path / "out")


def test_packed_dir_is_not_a_source(packed):
    with pytest.raises(CheckpointError, match="already a packed model"):
        make_plan(packed, packed.parent / "again")


def test_missing_source_path_and_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="no such directory"):
        make_plan(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match='not in the local Hugging Face cache.*"hf download org/model"'):
        make_plan("org/model")


def test_full_disk_is_refused_before_writing(sources, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DestinationError, match=r"need 0\.00 GB, 0\.00 GB free"):
        _repack(sources("tiny"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_disk_full_mid_write_then_resume(reference, tmp_path, monkeypatch):
    src, want = reference
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] > 6:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(DestinationError, match="disk full while writing .* run the same command again"):
        _repack(src, tmp_path / "out")
    monkeypatch.setattr(os, "pwrite", real)
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()
    _repack(src, tmp_path / "out")
    assert _tree(tmp_path / "out") == want


def test_refuses_to_overwrite_another_model(sources, tmp_path):
    dst = tmp_path / "out"
    _repack(sources("tiny"), dst)
    with pytest.raises(DestinationError, match="another checkpoint"):
        _repack(sources("reap"), dst)
    with pytest.raises(Interrupt):
        _repack(sources("q8"), tmp_path / "partial", after_layer=_interrupt_after_layer(0))
    with pytest.raises(DestinationError, match="interrupted repack of q8"):
        _repack(sources("reap"), tmp_path / "partial")
    (tmp_path / "locked").mkdir()
    with open(tmp_path / "locked" / ".repack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DestinationError, match="another streamer repack is writing here"):
            _repack(sources("tiny"), tmp_path / "locked")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not a streamer packed model"):
        _repack(sources("tiny"), tmp_path / "other")
    assert (tmp_path / "other" / "file.txt").read_text() == "mine"
