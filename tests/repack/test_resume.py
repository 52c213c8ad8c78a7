"""An interrupted repack (exception, SIGKILL at seeded points, damaged partial files) resumes and ends
byte-identical to an uninterrupted one; a damaged packed copy is repaired in place."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from streamer.errors import PackedFormatError
from streamer.storage.packed import open_packed
from streamer.storage.packed_format import MANIFEST_FILE, PROGRESS_FILE, RESIDENT_FILE
from streamer.storage.repack_plan import make_plan
from streamer.storage.verify import verify_packed
from tests.repack.helpers import (
    Interrupt,
    _flip,
    _interrupt_after_layer,
    _repack,
    _tree,
)


def _interrupt_at_bytes(limit):
    def progress(done, total):
        if done >= limit:
            raise Interrupt

    return progress


@pytest.mark.parametrize(
    "interrupt",
    [
        {"after_layer": _interrupt_after_layer(0)},
        {"after_layer": _interrupt_after_layer(3)},  # the last layer: only files and manifest were left
        {"progress": _interrupt_at_bytes(10_000)},  # inside resident.safetensors
        {"progress": _interrupt_at_bytes(2_000_000)},  # inside layer 1
    ],
    ids=["after-layer-0", "after-last-layer", "in-resident", "mid-layer"],
)
def test_resume_is_byte_identical(reference, tmp_path, small_groups, interrupt):
    src, want = reference
    dst = tmp_path / "out"
    with pytest.raises(Interrupt):
        _repack(src, dst, **interrupt)
    assert not (dst / MANIFEST_FILE).exists()
    with pytest.raises(PackedFormatError, match="incomplete"):
        open_packed(dst)
    result = _repack(src, dst)
    assert result.status == "resumed" and _tree(dst) == want
    assert _repack(src, dst).status == "already packed" and _tree(dst) == want


def test_resume_after_truncated_partial_and_damaged_layer(reference, tmp_path, small_groups):
    src, want = reference
    dst = tmp_path / "out"
    with pytest.raises(Interrupt):
        _repack(src, dst, progress=_interrupt_at_bytes(3_000_000))
    partial = next((dst / "experts").glob("*.partial"))
    os.truncate(partial, partial.stat().st_size // 2)
    os.truncate(dst / "experts" / "layer_000.bin", 20000)  # recorded as done, since damaged: redone
    _repack(src, dst)
    assert _tree(dst) == want


def test_sigkill_mid_layer_then_cli_resume(reference, tmp_path):
    """A real process killed with SIGKILL while writing a layer; `streamer repack` finishes the job."""
    src, want = reference
    dst = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from streamer.storage import repack\n"
        "from streamer.storage.repack import run_repack\n"
        "from streamer.storage.repack_plan import make_plan\n"
        "repack.GROUP_BYTES = 4 * 16384\n"
        "def progress(done, total):\n"
        "    if done > 2_000_000: os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_repack(make_plan(sys.argv[1], sys.argv[2]), progress=progress)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(src), str(dst)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert list((dst / "experts").glob("*.partial")) and not (dst / MANIFEST_FILE).exists()
    cli = [sys.executable, "-c", "from streamer.cli.main import main; main()", "repack", str(src), str(dst)]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr and _tree(dst) == want


_KILLER = """
import os, signal, sys
from streamer.storage import repack
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
repack.GROUP_BYTES = 4 * 16384
kind, arg = sys.argv[3].split(":")
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def progress(done, total):
    if kind == "bytes" and done >= int(arg):
        die()
real = repack.write_atomic
def write_atomic(path, data):  # "tmp": killed before the rename; "replace": right after it
    if kind == "tmp" and path.name == arg:
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        die()
    real(path, data)
    if kind == "replace" and path.name == arg:
        die()
repack.write_atomic = write_atomic
run_repack(make_plan(sys.argv[1], sys.argv[2]), progress=progress)
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_seeded_points_resumes_byte_identical(reference, tmp_path, seed):
    """One destination, killed (SIGKILL) again and again: at seeded random byte counts, while writing
    the journal, and just after the manifest; each run resumes the last and the end is byte-identical."""
    src, want = reference
    dst = tmp_path / "out"
    total = make_plan(src, dst).total_bytes
    points = sorted(random.Random(seed).sample(range(1, total), 3))
    kills = [f"bytes:{p}" for p in points] + [f"tmp:{PROGRESS_FILE}", f"replace:{MANIFEST_FILE}"]
    for kill in kills:
        run = subprocess.run([sys.executable, "-c", _KILLER, str(src), str(dst), kill], capture_output=True)
        assert run.returncode == -signal.SIGKILL, (kill, run.stderr.decode())
    assert (dst / MANIFEST_FILE).exists() and (dst / PROGRESS_FILE).exists()  # complete, not cleaned up
    cli = [sys.executable, "-c", "from streamer.cli.main import main; main()", "repack", str(src), str(dst)]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0 and "already packed" in done.stderr, done.stderr
    assert _tree(dst) == want
    verify_packed(dst)


def test_damaged_packed_model_is_repaired_in_place(reference, tmp_path):
    """A complete copy with a truncated layer, a missing tokenizer and a damaged resident header: repack
    rewrites just those (what the open-time checks name) and the result is byte-identical."""
    src, want = reference
    dst = tmp_path / "out"
    _repack(src, dst)
    os.truncate(dst / "experts" / "layer_002.bin", 50_000)
    (dst / "tokenizer.json").unlink()
    _flip(dst / RESIDENT_FILE, 100)
    with pytest.raises(PackedFormatError, match=r"rewrite the damaged files with \"streamer repack SRC"):
        open_packed(dst)
    result = _repack(src, dst)
    assert result.status == "repaired" and _tree(dst) == want
    assert result.bytes_written < sum(len(v) for v in want.values()) // 2  # layers 0, 1, 3 kept
    _flip(dst / "experts" / "layer_001.bin", 20_000)  # damage only a full verify sees
    with pytest.raises(PackedFormatError, match='rewrite .*layer_001.bin with "streamer repack'):
        verify_packed(dst)
    # repack re-checks every checksum before it says "already packed", so it finds and repairs this too
    assert _repack(src, dst).status == "repaired" and _tree(dst) == want
    assert _repack(src, dst).status == "already packed"
    (dst / "experts" / "layer_001.bin").unlink()
    assert _repack(src, dst).status == "repaired" and _tree(dst) == want
