"""What repack's mutation run (tools/mutation.py repack) found untested: the re-check's progress and
warning, grouping of resident tensors, leftovers of killed runs and their names, file modes, a source
that changes while copied or is truncated after planning, bytes written on resume, the manifest's model
type. Expected values are computed here from the files and the manifest, not taken from a run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from streamer.errors import CheckpointError
from streamer.storage import repack as repack_module
from streamer.storage.packed_format import MANIFEST_FILE, RESIDENT_FILE
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import DestinationError, make_plan
from streamer.storage.safetensors_file import read_header
from streamer.storage.verify import read_any_manifest, verify_packed
from streamer.synthetic.writer import generate
from tests.repack.helpers import Interrupt, _assert_reproduces, _flip, _interrupt_after_layer


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("mutants") / "src", "tiny", dtype="float32", seed=3)


def _checked(src, dst, layers=None, **kw):
    seen = []
    result = run_repack(make_plan(src, dst, layers), check_progress=lambda d, t: seen.append((d, t)), **kw)
    return result, seen


def _data_bytes(dst) -> int:
    """What a re-check reads, by hand: the resident tensors' bytes, every held expert block, the copied
    files (not the files' headers or padding)."""
    copy = read_any_manifest(dst)
    resident = sum(t.nbytes for t in read_header(dst / RESIDENT_FILE)[0].values())
    experts = sum(e.num_experts * e.block_bytes for e in copy.held_layers)
    return resident + experts + sum(f["bytes"] for f in copy.files.values())


@pytest.mark.parametrize("layers", [None, "2:3"], ids=["whole", "stage"])
def test_the_recheck_reports_its_progress(src, tmp_path, layers):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst, layers))
    result, seen = _checked(src, dst, layers)
    assert result.status == "already packed"
    done = [d for d, _ in seen]
    assert len(seen) > 3 and done == sorted(done) and done[0] > 0
    assert done[-1] == _data_bytes(dst)
    assert {t for _, t in seen} == {done[-1]}  # one total, and the progress reaches it


@pytest.mark.parametrize("layers", [None, "2:3"], ids=["whole", "stage"])
def test_the_recheck_progress_ends_at_its_total(src, tmp_path, layers):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst, layers))
    _, seen = _checked(src, dst, layers)
    assert seen[-1][0] == seen[-1][1]


def test_a_damaged_stage_copy_is_named_in_the_warning(src, tmp_path, caplog):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst, "2:3"))
    entry = read_any_manifest(dst).layers[2]
    _flip(dst / entry.file, entry.block_offset(1) + 3)
    with caplog.at_level(logging.WARNING, logger="streamer.storage.repack"):
        result, _ = _checked(src, dst, "2:3")
    assert result.status == "repaired"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "streamer.storage.repack"]
    assert warning.startswith(f"{dst} is damaged (") and warning.endswith("): rewriting what is damaged")
    assert "layer 2 expert 1" in warning


T = namedtuple("T", "name nbytes")


def test_resident_groups_share_small_tensors_and_split_large_ones(monkeypatch):
    monkeypatch.setattr(repack_module, "GROUP_BYTES", 100)
    a, b, c, d = T("a", 30), T("b", 30), T("c", 250), T("d", 10)
    assert repack_module._resident_groups((a, b, c, d)) == [
        [(a, 0, 30), (b, 0, 30), (c, 0, 40)],
        [(c, 40, 100)],
        [(c, 140, 100)],
        [(c, 240, 10), (d, 0, 10)],
    ]
    assert repack_module._resident_groups(()) == []
    assert repack_module._resident_groups((T("e", 100), T("f", 1))) == [
        [(T("e", 100), 0, 100)],
        [(T("f", 1), 0, 1)],
    ]


def test_an_already_packed_copy_loses_the_leftovers_of_a_killed_run(src, tmp_path):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst))
    stray = [
        dst / (RESIDENT_FILE + ".partial"),
        dst / "manifest.json.tmp",
        dst / "experts/layer_001.bin.partial",
    ]
    for f in stray:
        f.write_bytes(b"left by a killed run")
    assert run_repack(make_plan(src, dst)).status == "already packed"
    assert not any(f.exists() for f in stray)


def test_an_interrupted_resident_write_leaves_only_a_partial_file(src, tmp_path):
    dst = tmp_path / "out"

    def stop(done, total):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_repack(make_plan(src, dst), progress=stop)  # the resident file is written first
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith("resident")) == [
        RESIDENT_FILE + ".partial"
    ]
    assert run_repack(make_plan(src, dst)).status == "resumed"
    assert not [p for p in dst.rglob("*") if p.name.endswith(".partial")]


def test_written_files_are_not_executable(src, tmp_path):
    dst = tmp_path / "out"
    old = os.umask(0o022)
    try:
        run_repack(make_plan(src, dst))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [dst / RESIDENT_FILE, *(dst / "experts").iterdir()]}
    assert set(modes.values()) == {0o644}, modes


def test_a_source_file_that_changes_while_copied_is_refused_and_leaves_a_partial_copy(
    src, tmp_path, monkeypatch
):
    dst = tmp_path / "out"
    real = repack_module.crc32_file

    def edited_meanwhile(path):  # the source's bytes differ from the copy's, as if edited mid-copy
        return real(path) ^ (0 if str(path).endswith(".partial") else 1)

    monkeypatch.setattr(repack_module, "crc32_file", edited_meanwhile)
    with pytest.raises(CheckpointError) as e:
        run_repack(make_plan(src, dst))
    name = str(e.value).split(": changed while being copied")[0]
    assert str(e.value) == f"{name}: changed while being copied" and (src / Path(name).name).exists()
    assert (dst / (Path(name).name + ".partial")).exists() and not (dst / Path(name).name).exists()
    monkeypatch.setattr(repack_module, "crc32_file", real)
    assert run_repack(make_plan(src, dst)).status == "resumed"
    assert not [p for p in dst.rglob("*") if p.name.endswith(".partial")]


def test_bytes_written_count_what_this_run_wrote(src, tmp_path):
    dst = tmp_path / "out"
    plan = make_plan(src, dst)
    assert run_repack(plan).bytes_written == plan.total_bytes  # resident file and expert files
    with pytest.raises(Interrupt):
        run_repack(make_plan(src, tmp_path / "cut"), after_layer=_interrupt_after_layer(1))
    resumed = run_repack(make_plan(src, tmp_path / "cut"))
    kept = [dst / RESIDENT_FILE, dst / "experts/layer_000.bin", dst / "experts/layer_001.bin"]
    assert resumed.status == "resumed"
    assert resumed.bytes_written == plan.total_bytes - sum(f.stat().st_size for f in kept)


def test_a_shard_truncated_after_planning_names_the_tensor_that_ends_early(src, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    plan = make_plan(copy, tmp_path / "out")
    [shard] = copy.glob("*.safetensors")
    end = shard.stat().st_size - 1000
    cut = {t.name for t in read_header(shard)[0].values() if t.offset + t.nbytes > end}  # lose bytes
    os.truncate(shard, end)
    with pytest.raises(CheckpointError) as e:
        run_repack(plan)
    name = str(e.value).split("tensor '")[-1].split("'")[0]
    assert name in cut
    assert str(e.value) == f"{shard}: tensor '{name}' ends early (shard truncated or being rewritten?)"


@pytest.mark.parametrize("layers", [None, "2:3"], ids=["whole", "stage"])
def test_the_manifest_records_the_source_model_type(src, tmp_path, layers):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst, layers))
    want = json.loads((src / "config.json").read_text())["model_type"]
    assert want and read_any_manifest(dst).model_type == want


def test_tensors_spanning_checksum_slices_are_written_and_checksummed_whole(src, tmp_path, monkeypatch):
    """Slices of 1000 bytes: most tensors and expert components cross a slice edge (1 MiB in real use,
    larger than every tensor of the tiny model)."""
    monkeypatch.setattr(repack_module, "SLICE_BYTES", 1000)
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst))
    _assert_reproduces(src, dst)
    verify_packed(dst)


@pytest.mark.parametrize("group_bytes, most, per", [(16384, 256, 1), (1 << 30, 3, 3)])
def test_expert_groups_are_bounded_by_bytes_and_by_count(src, tmp_path, monkeypatch, group_bytes, most, per):
    """Each expert group is reported once written: a layer's progress steps are its header, then groups
    of ``per`` blocks (the rest last): at most GROUP_BYTES, never below one expert, at most
    MAX_GROUP_EXPERTS."""
    monkeypatch.setattr(repack_module, "GROUP_BYTES", group_bytes)
    monkeypatch.setattr(repack_module, "MAX_GROUP_EXPERTS", most)
    dst, seen = tmp_path / "out", [0]
    plan = make_plan(src, dst)
    run_repack(plan, progress=lambda done, total: seen.append(done))
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    entry = plan.layers[0]
    assert entry.block_bytes == 16384 and entry.num_experts == 16
    sizes = [per] * (16 // per) + ([16 % per] if 16 % per else [])
    layer = [entry.data_offset] + [n * entry.block_bytes for n in sizes]
    assert steps[-len(layer) * 4 :] == layer * 4  # the 4 layers, written after the resident file


def test_an_already_packed_result(src, tmp_path):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst))
    result = run_repack(make_plan(src, dst))
    assert (result.dst, result.status, result.bytes_written) == (dst, "already packed", 0)
    assert 0 <= result.seconds < 300


def test_the_space_check_asks_for_what_is_left_to_write(src, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(repack_module, "_check_space", lambda plan, needed: asked.append(needed))
    dst = tmp_path / "out"
    plan = make_plan(src, dst)
    with pytest.raises(Interrupt):
        run_repack(plan, after_layer=_interrupt_after_layer(1))
    run_repack(make_plan(src, dst))
    kept = [dst / RESIDENT_FILE, dst / "experts/layer_000.bin", dst / "experts/layer_001.bin"]
    everything = plan.total_bytes + sum(f.stat().st_size for f in plan.checkpoint.extra_files)
    assert asked == [everything, everything - sum(f.stat().st_size for f in kept)]


def test_a_destination_that_changes_while_starting_is_refused(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real, calls = repack_module.destination_status, []

    def changing(plan):
        calls.append(1)
        status, journal = real(plan)
        return ("partial" if len(calls) > 1 else status), journal

    monkeypatch.setattr(repack_module, "destination_status", changing)
    with pytest.raises(DestinationError) as e:
        run_repack(make_plan(src, dst))
    assert str(e.value) == f"{dst} changed while starting; run the command again"


def test_a_copy_being_repaired_does_not_look_complete(src, tmp_path):
    dst = tmp_path / "out"
    run_repack(make_plan(src, dst))
    entry = read_any_manifest(dst).layers[2]
    _flip(dst / entry.file, entry.block_offset(0) + 5)
    manifest_there = []
    result = run_repack(
        make_plan(src, dst), after_layer=lambda layer: manifest_there.append((dst / MANIFEST_FILE).exists())
    )
    assert result.status == "repaired" and manifest_there == [False]
    verify_packed(dst)


def test_a_stage_copy_of_another_checkpoint_is_refused_naming_it(src, tmp_path):
    other = generate(tmp_path / "other-model", "tiny", dtype="float32", seed=4)
    dst = tmp_path / "out"
    run_repack(make_plan(other, dst, "2:3"))
    with pytest.raises(DestinationError) as e:
        run_repack(make_plan(src, dst, "2:3"))
    assert str(e.value) == (
        f"{dst} holds a packed copy of another checkpoint (other-model); "
        "choose another destination or delete it"
    )


def test_a_fresh_result(src, tmp_path):
    dst = tmp_path / "out"
    result = run_repack(make_plan(src, dst))
    assert (result.dst, result.status) == (dst, "packed") and 0 <= result.seconds < 300


def test_a_full_disk_while_writing_says_how_to_resume(src, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(repack_module, "_write_all_steps", full)
    dst = tmp_path / "out"
    with pytest.raises(DestinationError) as e:
        run_repack(make_plan(src, dst))
    assert str(e.value) == (
        f"disk full while writing {dst}: free some space and run the same command again to resume"
    )
