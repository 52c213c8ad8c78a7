"""`streamer repack --layers FIRST:LAST`: a pipeline stage's copy holds only what that stage's rank reads,
loads as that rank (same logits as a whole copy), never passes for a whole model, resumes after kill -9,
is verified over the layers it holds, and becomes a whole copy (or another stage's) keeping its layers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.distributed.split import stage_costs
from streamer.distributed.stage import load_stage, open_stage_packed
from streamer.errors import ConfigError, PackedFormatError
from streamer.loader import load_streamed
from streamer.settings import RuntimeConfig
from streamer.storage.packed import open_packed
from streamer.storage.packed_format import MANIFEST_FILE, PROGRESS_FILE, RESIDENT_FILE, resident_layer_of
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import DestinationError, make_plan, parse_layers
from streamer.storage.safetensors_file import read_header
from streamer.storage.verify import read_any_manifest, verify_packed
from streamer.synthetic.writer import generate
from tests.repack.helpers import Interrupt, _flip, _interrupt_after_layer, _read, _tree

TOKENS = [[5, 77, 301, 12, 9, 44, 500, 3]]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """A float32 "tiny" source (4 layers), its whole packed copy and the copies of stages 0:1 and 2:3."""
    root = tmp_path_factory.mktemp("layers")
    src = generate(root / "src", "tiny", dtype="float32", seed=11)
    for name, layers in (("whole", None), ("s01", "0:1"), ("s23", "2:3")):
        run_repack(make_plan(src, root / name, layers))
    return src, root


def _stage_repack(src: Path, dst: Path, layers: str | None, **kw):
    return run_repack(make_plan(src, dst, layers), **kw)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---- what a stage's copy holds ------------------------------------------------------------------------


@pytest.mark.parametrize("name, held, front", [("s01", [0, 1], True), ("s23", [2, 3], False)])
def test_a_stage_copy_holds_exactly_its_share_with_the_whole_copy_bytes(copies, name, held, front):
    _, root = copies
    whole, stage = root / "whole", root / name
    experts = {f"experts/layer_{i:03d}.bin" for i in range(4)}
    want = (_files(whole) - experts) | {f"experts/layer_{i:03d}.bin" for i in held}
    assert _files(stage) == want
    for i in held:  # expert files byte for byte as in the whole copy
        assert (stage / f"experts/layer_{i:03d}.bin").read_bytes() == (
            whole / f"experts/layer_{i:03d}.bin"
        ).read_bytes()
    full, mine = read_header(whole / RESIDENT_FILE)[0], read_header(stage / RESIDENT_FILE)[0]
    layer_of = {n: resident_layer_of(n) for n in full}
    assert set(mine) == {n for n, i in layer_of.items() if (front if i is None else i in held)}
    assert any(layer_of[n] is None for n in mine) == front  # embedding and head only on rank 0's stage
    for n, t in mine.items():
        f = full[n]
        assert _read(t.path, t.offset, t.nbytes) == _read(f.path, f.offset, f.nbytes), n
    m, w = read_any_manifest(stage), open_packed(whole).manifest
    assert [e.layer for e in m.held_layers] == held
    assert [m.layers[i] for i in held] == [w.layers[i] for i in held]  # checksums included
    assert all(m.layers[i].crc32 == () for i in range(4) if i not in held)
    assert m.resident_crc32 == {n: c for n, c in w.resident_crc32.items() if n in mine}


def test_every_rank_computes_the_same_split_from_a_stage_copy(copies):
    _, root = copies
    want = stage_costs(open_packed(root / "whole"))
    for name in ("s01", "s23"):
        assert stage_costs(open_stage_packed(root / name, range(0))) == want


# ---- a stage's copy runs as its rank -----------------------------------------------------------------


def _logits_through(stages) -> mx.array:
    h = stages[0].embed(mx.array(TOKENS))
    for s in stages:
        h = s.run(h, s.make_cache())
    return stages[0].head(h)


def test_stage_copies_load_as_their_ranks_and_give_the_whole_models_logits(copies):
    _, root = copies
    config = RuntimeConfig(dtype="float32")
    engine = load_streamed(root / "whole", config)
    try:
        want = engine.model(mx.array(TOKENS))
        mx.eval(want)
    finally:
        engine.runtime.close()
    stages = [
        load_stage(root / "s01", config, range(0, 2), front=True, rank=0),
        load_stage(root / "s23", config, range(2, 4), front=False, rank=1),
    ]
    try:
        got = _logits_through(stages)
        assert mx.array_equal(got, want).item()
        assert sorted(stages[1].runtime.store._fds) == [2, 3]
    finally:
        for s in stages:
            s.close()


@pytest.mark.parametrize(
    "copy, layers, front, lacks, fix",
    [
        ("s23", range(1, 4), False, "lacks layer 1", "--layers 1:3"),  # the split moved: layer 1 too
        ("s23", range(2, 4), True, "lacks the embedding and output head", "--layers 2:3"),
        ("s01", range(0, 3), True, "lacks layer 2", "--layers 0:2"),
    ],
)
def test_a_rank_whose_copy_lacks_its_layers_fails_with_one_line(copies, copy, layers, front, lacks, fix):
    _, root = copies
    with pytest.raises(PackedFormatError) as e:
        load_stage(root / copy, RuntimeConfig(), layers, front=front, rank=1)
    msg = str(e.value)
    assert msg.startswith("rank 1: ") and "\n" not in msg, msg
    assert lacks in msg and f'"streamer repack SRC {root / copy} {fix}"' in msg, msg


def test_a_rank_missing_files_of_a_whole_copy_names_them_and_both_fixes(copies, tmp_path):
    _, root = copies
    part = tmp_path / "part"
    for rel in _files(root / "whole") - {"experts/layer_002.bin"}:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).symlink_to(root / "whole" / rel)
    with pytest.raises(PackedFormatError) as e:
        load_stage(part, RuntimeConfig(), range(1, 4), front=False, rank=1)
    msg = str(e.value)
    assert msg.startswith("rank 1: ") and "lacks files its stage (layers 1-3) needs: layer 2 (" in msg, msg
    assert "layer_002.bin: missing" in msg and "--layers 1:3" in msg and "copy those" in msg, msg


def test_a_rank_whose_stage_copy_lost_its_resident_file_names_it(copies, tmp_path):
    src, _ = copies
    dst = tmp_path / "s23"
    _stage_repack(src, dst, "2:3")
    os.truncate(dst / RESIDENT_FILE, 1000)
    with pytest.raises(PackedFormatError) as e:
        load_stage(dst, RuntimeConfig(), range(2, 4), front=False, rank=1)
    msg = str(e.value)
    assert msg.startswith("rank 1: ") and f"{RESIDENT_FILE}: 1000 bytes" in msg and "--layers 2:3" in msg, msg


# ---- never a whole model ----------------------------------------------------------------------------


def test_a_stage_copy_never_passes_for_a_whole_model(copies):
    _, root = copies
    stage = root / "s23"
    with pytest.raises(PackedFormatError, match="holds only layers 2-3 of 4"):
        open_packed(stage)
    result = CliRunner().invoke(main, ["generate", str(stage), "--prompt-ids", "1,2", "-n", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "layers 0-1 missing" in lines[0] and "mlx.launch" in lines[0], lines[0]
    assert f'"streamer repack SRC {stage}"' in lines[0], lines[0]


def test_a_complete_stage_copy_is_left_alone(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "s23"
    _stage_repack(src, dst, "2:3")
    before = _tree(dst)
    assert _stage_repack(src, dst, "2:3").status == "already packed"
    assert _tree(dst) == before == _tree(root / "s23")


# ---- verify -----------------------------------------------------------------------------------------


def test_verify_names_the_layers_a_stage_copy_holds(copies):
    _, root = copies
    run = CliRunner().invoke(main, ["verify", str(root / "s23")])
    assert run.exit_code == 0, run.output
    assert "layers 2-3 of 4 (a pipeline stage's copy)" in run.output and "32 expert blocks" in run.output
    run = CliRunner().invoke(main, ["verify", str(root / "s23"), "--layers", "1:3"])
    assert run.exit_code != 0 and "not layer 1" in run.output, run.output


@pytest.mark.parametrize(
    "where, component",
    [("expert", "gate_proj.weight"), ("expert", "down_proj.scales"), ("expert", "down_proj.weight")],
)
def test_damage_in_a_held_layer_is_caught_and_repaired_by_the_same_command(
    copies, tmp_path, where, component
):
    src, root = copies
    dst = tmp_path / "s23"
    _stage_repack(src, dst, "2:3")
    want = _tree(dst)
    entry = read_any_manifest(dst).layers[3]
    c = entry.component(component)
    resident = os.stat(dst / RESIDENT_FILE).st_ino
    _flip(dst / entry.file, entry.block_offset(5) + c.offset + c.nbytes // 2)
    with pytest.raises(PackedFormatError) as e:
        verify_packed(dst)
    msg = str(e.value)
    assert f"layer 3 expert 5 component {component}: checksum mismatch" in msg, msg
    assert f'"streamer repack SRC {dst} --layers 2:3"' in msg, msg  # repaired as a stage, not completed
    assert _stage_repack(src, dst, "2:3").status == "repaired"
    assert _tree(dst) == want and os.stat(dst / RESIDENT_FILE).st_ino == resident  # only the damage rewritten


def test_damage_in_a_stage_copys_resident_file_is_caught(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "s01"
    _stage_repack(src, dst, "0:1")
    t = read_header(dst / RESIDENT_FILE)[0]["language_model.model.embed_tokens.weight"]
    want = _tree(dst)
    _flip(dst / RESIDENT_FILE, t.offset + 7)
    with pytest.raises(PackedFormatError, match="embed_tokens.weight': checksum mismatch"):
        verify_packed(dst)
    assert _stage_repack(src, dst, "0:1").status == "repaired" and _tree(dst) == want


def test_a_missing_file_of_a_stage_copy_is_rewritten(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "s23"
    _stage_repack(src, dst, "2:3")
    (dst / "experts/layer_003.bin").unlink()
    with pytest.raises(PackedFormatError, match=r"layer_003.bin: missing; rewrite .* --layers 2:3"):
        verify_packed(dst)
    assert _stage_repack(src, dst, "2:3").status == "repaired" and _tree(dst) == _tree(root / "s23")


def test_verify_layers_checks_a_subset_of_a_whole_copy(copies, tmp_path):
    src, _ = copies
    dst = tmp_path / "whole"
    _stage_repack(src, dst, None)
    entry = open_packed(dst).manifest.layers[3]
    c = entry.component("down_proj.weight")
    _flip(dst / entry.file, entry.block_offset(0) + c.offset)
    ok = CliRunner().invoke(main, ["verify", str(dst), "--layers", "0:2"])
    assert ok.exit_code == 0 and "layers 0-2 of 4:" in ok.output, ok.output
    bad = CliRunner().invoke(main, ["verify", str(dst), "--layers", "3:3"])
    assert bad.exit_code != 0 and "layer 3 expert 0 component down_proj.weight" in bad.output, bad.output


# ---- resume, completion, other stages ---------------------------------------------------------------


@pytest.mark.parametrize(
    "interrupt",
    [
        {"after_layer": _interrupt_after_layer(2)},
        {"progress": lambda done, total: done > 200_000 and _raise()},
    ],
    ids=["after-first-layer", "mid-layer"],
)
def test_an_interrupted_stage_repack_resumes_byte_identical(copies, tmp_path, small_groups, interrupt):
    src, root = copies
    dst = tmp_path / "s23"
    with pytest.raises(Interrupt):
        _stage_repack(src, dst, "2:3", **interrupt)
    assert not (dst / MANIFEST_FILE).exists() and (dst / PROGRESS_FILE).exists()
    assert _stage_repack(src, dst, "2:3").status == "resumed"
    assert _tree(dst) == _tree(root / "s23")


def _raise():
    raise Interrupt


def test_a_stage_repack_killed_with_sigkill_resumes_byte_identical(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "s23"
    script = (
        "import os, signal, sys\n"
        "from streamer.storage import repack\n"
        "from streamer.storage.repack import run_repack\n"
        "from streamer.storage.repack_plan import make_plan\n"
        "repack.GROUP_BYTES = 4 * 16384\n"
        "def progress(done, total):\n"
        "    if done > 300_000:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_repack(make_plan(sys.argv[1], sys.argv[2], '2:3'), progress=progress)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(dst)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (dst / MANIFEST_FILE).exists()
    run = CliRunner().invoke(main, ["repack", str(src), str(dst), "--layers", "2:3"])
    assert run.exit_code == 0 and "resumed layers 2-3 of 4" in run.output, run.output
    assert _tree(dst) == _tree(root / "s23")


def test_repack_without_layers_completes_a_stage_copy_keeping_its_layers(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "out"
    _stage_repack(src, dst, "2:3")
    kept = {i: os.stat(dst / f"experts/layer_{i:03d}.bin").st_ino for i in (2, 3)}
    with pytest.raises(Interrupt):
        _stage_repack(src, dst, None, after_layer=_interrupt_after_layer(0))
    with pytest.raises(PackedFormatError, match="incomplete"):  # neither the stage's copy nor a whole one
        read_any_manifest(dst)
    result = _stage_repack(src, dst, None)
    assert result.status == "resumed"
    assert _tree(dst) == _tree(root / "whole")
    assert {i: os.stat(dst / f"experts/layer_{i:03d}.bin").st_ino for i in (2, 3)} == kept  # not rewritten
    open_packed(dst)  # a whole model now


def test_a_stage_copy_becomes_another_stages_keeping_the_layers_both_hold(copies, tmp_path):
    src, _ = copies
    dst, fresh = tmp_path / "out", tmp_path / "fresh"
    _stage_repack(src, dst, "2:3")
    kept = os.stat(dst / "experts/layer_002.bin").st_ino
    seen = []
    assert (
        _stage_repack(src, dst, "1:2", progress=lambda done, total: seen.append((done, total))).status
        == "resumed"
    )
    assert seen[-1][0] == seen[-1][1]  # layer 3 is not this stage's: not counted as done
    _stage_repack(src, fresh, "1:2")
    want = _tree(fresh)
    got = {k: v for k, v in _tree(dst).items() if k != "experts/layer_003.bin"}  # left there, not held
    assert got == want and os.stat(dst / "experts/layer_002.bin").st_ino == kept


def test_layers_on_an_intact_whole_copy_keeps_it_whole(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "whole"
    _stage_repack(src, dst, None)
    run = CliRunner().invoke(main, ["repack", str(src), str(dst), "--layers", "2:3"])
    assert run.exit_code == 0 and "serves every stage" in run.output and "already packed" in run.output
    assert _tree(dst) == _tree(root / "whole")


def test_layers_on_a_whole_copy_missing_other_stages_files_makes_it_this_stages_copy(copies, tmp_path):
    src, root = copies
    dst = tmp_path / "part"
    _stage_repack(src, dst, None)
    for i in (0, 1):
        (dst / f"experts/layer_{i:03d}.bin").unlink()  # another machine holds them
    kept = os.stat(dst / "experts/layer_003.bin").st_ino
    assert _stage_repack(src, dst, "2:3").status == "resumed"
    assert _tree(dst) == _tree(root / "s23") and os.stat(dst / "experts/layer_003.bin").st_ino == kept


def test_a_stage_copy_of_another_checkpoint_is_refused(copies, tmp_path):
    src, root = copies
    other = generate(tmp_path / "other", "tiny", dtype="float32", seed=12)
    for layers in ("2:3", "0:1", None):
        with pytest.raises(DestinationError, match="holds a packed copy of another checkpoint"):
            _stage_repack(other, root / "s23", layers)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["stage"].update(layers=[2, 4]), "do not fit 4 layers"),
        (lambda d: d["stage"].update(resident_layer_bytes=[1, 2]), "do not fit 4 layers"),
        (lambda d: d["layers"][1].update(crc32=d["layers"][2]["crc32"]), "layer 1: 16 crc rows"),
        (lambda d: d["layers"][2].update(crc32=[]), "layer 2: 0 crc rows"),
    ],
    ids=["layers-out-of-range", "short-byte-table", "unheld-layer-with-checksums", "held-layer-without"],
)
def test_a_malformed_stage_record_is_refused(copies, tmp_path, edit, message):
    src, _ = copies
    dst = tmp_path / "s23"
    _stage_repack(src, dst, "2:3")
    doc = json.loads((dst / MANIFEST_FILE).read_text())
    edit(doc)
    (dst / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(PackedFormatError, match="malformed manifest") as e:
        read_any_manifest(dst)
    assert message in str(e.value)


# ---- the flag ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["x", "3", "2:1", "0:4", "-1:2", "1-2"])
def test_bad_layers_name_the_flag_and_its_form(text):
    with pytest.raises(ConfigError, match=r"--layers takes FIRST:LAST, both included, counted from 0"):
        parse_layers(text, 4)


def test_layers_are_inclusive_and_every_layer_is_a_whole_copy(copies, tmp_path):
    src, root = copies
    assert parse_layers("0:23", 60) == range(0, 24) and parse_layers(" 5 : 5 ", 8) == range(5, 6)
    plan = make_plan(src, tmp_path / "all", "0:3")
    assert plan.stage is None
    run_repack(plan)
    assert _tree(tmp_path / "all") == _tree(root / "whole")


def test_list_and_info_say_a_copy_is_a_stages(copies, monkeypatch, tmp_path):
    src, root = copies
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    _stage_repack(src, models / "org--tiny", "2:3")
    listing = CliRunner().invoke(main, ["list"])
    assert listing.exit_code == 0 and "layers 2-3 of 4 (a pipeline stage's copy)" in listing.output
    info = CliRunner().invoke(main, ["info", str(models / "org--tiny")])
    assert info.exit_code == 0 and "stage      layers 2-3 of 4" in info.output, info.output
    manifest = json.loads((models / "org--tiny" / MANIFEST_FILE).read_text())
    assert manifest["stage"]["layers"] == [2, 3]
