"""`streamer repack`: packed output reproduces the source exactly, resumes byte-identically, fails clearly.

Sources are synthetic mlx-community checkpoints built in tmp dirs with small shards (multi-shard sources).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.errors import CheckpointError, PackedFormatError
from streamer.storage import paths
from streamer.storage.checkpoint import load_checkpoint
from streamer.storage.packed import open_packed, read_manifest
from streamer.storage.packed_format import MANIFEST_FILE, PROGRESS_FILE, RESIDENT_FILE
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import DestinationError, make_plan
from streamer.storage.safetensors_file import read_header
from streamer.storage.verify import verify_packed
from streamer.synthetic.writer import generate

SHARD_BYTES = 256 << 10


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _assert_reproduces(src: Path, dst: Path) -> None:
    """Every resident tensor and every expert component holds exactly the source's bytes."""
    tensors = load_checkpoint(src).tensors
    resident = read_header(dst / RESIDENT_FILE)[0]
    model = open_packed(dst)
    expert_names = {c.tensor for e in model.manifest.layers for c in e.components}
    assert set(resident) | expert_names == set(tensors) and not set(resident) & expert_names
    for name, t in resident.items():
        s = tensors[name]
        assert (t.dtype, t.shape) == (s.dtype, s.shape)
        assert _read(t.path, t.offset, t.nbytes) == _read(s.path, s.offset, s.nbytes), name
    for entry in model.manifest.layers:
        for e in range(entry.num_experts):
            block = _read(dst / entry.file, entry.block_offset(e), entry.block_bytes)
            for c in entry.components:
                s = tensors[c.tensor]
                assert s.shape == (entry.num_experts, *c.shape)
                want = _read(s.path, s.offset + e * c.nbytes, c.nbytes)
                assert block[c.offset : c.offset + c.nbytes] == want, (
                    entry.layer,
                    e,
                    c.name,
                )


def _repack(src: Path, dst: Path, **kw):
    return run_repack(make_plan(src, dst), **kw)


@pytest.mark.parametrize("preset", ["tiny", "like-397b", "like-35b", "reap", "mixed", "q8"])
def test_repack_reproduces_every_preset(sources, tmp_path, preset):
    src = sources(preset)
    result = _repack(src, tmp_path / "out")
    assert result.status == "packed"
    _assert_reproduces(src, tmp_path / "out")
    manifest = verify_packed(tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    tc, quant = config["text_config"], config["quantization"]
    assert [e.num_experts for e in manifest.layers] == [tc["num_experts"]] * tc["num_hidden_layers"]
    for entry in manifest.layers:
        assert entry.block_bytes % 16384 == 0 and all(c.offset % 64 == 0 for c in entry.components)
        for c in entry.components:
            q = quant.get(c.tensor.rsplit(".", 1)[0], quant)
            assert (c.bits, c.group_size) == (q["bits"], q["group_size"]), (entry.layer, c.name)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert not list((tmp_path / "out").rglob("*.partial")) and not (tmp_path / "out" / PROGRESS_FILE).exists()


def test_mixed_layers_have_their_own_bits_and_block_shapes(sources, tmp_path):
    _repack(sources("mixed"), tmp_path / "out")
    layers = read_manifest(tmp_path / "out").layers
    bits = [{c.name: c.bits for c in e.components if c.name.endswith("weight")} for e in layers]
    assert bits[0] == {"gate_proj.weight": 3, "up_proj.weight": 3, "down_proj.weight": 6}
    assert bits[1] == {"gate_proj.weight": 4, "up_proj.weight": 4, "down_proj.weight": 6}
    assert layers[0].component("down_proj.weight").offset != layers[1].component("down_proj.weight").offset


def test_resident_loads_like_the_source_with_mx_load(sources, tmp_path):
    src = sources("tiny", "float32")
    _repack(src, tmp_path / "out")
    resident = open_packed(tmp_path / "out").load_resident()
    reference = {}
    for shard in src.glob("*.safetensors"):
        reference.update(mx.load(str(shard)))
    assert set(resident) < set(reference)
    for name, arr in resident.items():
        assert arr.dtype == reference[name].dtype and mx.array_equal(arr, reference[name]).item(), name


def _save_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A single-shard copy of ``src`` whose tensors went through ``edit(dict)``."""
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(mx.load(str(shard)))
    edit(tensors)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "mlx"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def test_per_layer_expert_counts_come_from_the_tensors(sources, tmp_path):
    """A REAP-style checkpoint pruned differently per layer (layer 1 keeps 10 of 16 experts)."""
    p = "language_model.model.layers.1.mlp."

    def prune(t):
        for name in [n for n in t if n.startswith(p + "switch_mlp.") or n.startswith(p + "gate.")]:
            t[name] = t[name][:10]

    src = _save_checkpoint(sources("tiny"), tmp_path / "pruned", prune)
    _repack(src, tmp_path / "out")
    assert [e.num_experts for e in read_manifest(tmp_path / "out").layers] == [16, 10, 16, 16]
    _assert_reproduces(src, tmp_path / "out")
    verify_packed(tmp_path / "out")


def test_unquantized_experts_have_only_weights(sources, tmp_path):
    def dequantize_experts(t):
        for name in [n for n in t if ".switch_mlp." in n and n.endswith(".weight")]:
            base = name[: -len(".weight")]
            scales, biases = t.pop(base + ".scales"), t.pop(base + ".biases")
            t[name] = mx.dequantize(t[name], scales, biases, group_size=64, bits=4)

    src = _save_checkpoint(sources("tiny"), tmp_path / "dense", dequantize_experts)
    _repack(src, tmp_path / "out")
    entry = read_manifest(tmp_path / "out").layers[0]
    assert [(c.name, c.dtype, c.shape, c.bits) for c in entry.components] == [
        ("gate_proj.weight", "BF16", (64, 128), None),
        ("up_proj.weight", "BF16", (64, 128), None),
        ("down_proj.weight", "BF16", (128, 64), None),
    ]
    _assert_reproduces(src, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# Resume.


@pytest.fixture
def small_groups(monkeypatch):
    """Groups of 4 experts, so that progress (and interruptions) happen many times inside a layer."""
    monkeypatch.setattr("streamer.storage.repack.GROUP_BYTES", 4 * 16384)


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
    """An uninterrupted repack of like-35b: (source, its packed tree)."""
    src = sources("like-35b")
    dst = tmp_path_factory.mktemp("ref") / "out"
    _repack(src, dst)
    return src, _tree(dst)


def _interrupt_after_layer(n):
    def hook(layer):
        if layer == n:
            raise Interrupt

    return hook


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
    with pytest.raises(PackedFormatError, match="delete .*layer_001.bin, then rewrite it with"):
        verify_packed(dst)
    assert _repack(src, dst).status == "already packed"
    (dst / "experts" / "layer_001.bin").unlink()
    assert _repack(src, dst).status == "repaired" and _tree(dst) == want


# ----------------------------------------------------------------------------------------------------
# Verify.


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.fixture
def packed(sources, tmp_path):
    dst = tmp_path / "out"
    _repack(sources("tiny"), dst)
    return dst


def test_verify_names_layer_expert_component_of_a_flipped_byte(packed):
    entry = read_manifest(packed).layers[2]
    c = entry.component("up_proj.scales")
    _flip(packed / entry.file, entry.block_offset(5) + c.offset + 3)
    open_packed(packed)  # sizes and headers still fine: only a full verify sees it
    with pytest.raises(
        PackedFormatError, match="layer 2 expert 5 component up_proj.scales: checksum mismatch"
    ):
        verify_packed(packed)
    result = CliRunner().invoke(main, ["verify", str(packed)])
    assert result.exit_code == 1 and "layer 2 expert 5 component up_proj.scales" in result.output
    assert "Traceback" not in result.output


def test_verify_catches_resident_padding_header_and_size_damage(packed, tmp_path):
    pristine = _tree(packed)

    def restore():
        for rel, data in pristine.items():
            (packed / rel).write_bytes(data)

    t = read_header(packed / RESIDENT_FILE)[0]["language_model.model.norm.weight"]
    _flip(packed / RESIDENT_FILE, t.offset)
    with pytest.raises(PackedFormatError, match="resident tensor 'language_model.model.norm.weight'"):
        verify_packed(packed)
    restore()
    entry = read_manifest(packed).layers[1]
    _flip(packed / entry.file, entry.block_offset(3) + entry.block_bytes - 1)  # tiny blocks end in padding
    with pytest.raises(PackedFormatError, match="layer 1 expert 3: non-zero bytes in block padding"):
        verify_packed(packed)
    restore()
    _flip(packed / entry.file, 20)
    with pytest.raises(PackedFormatError, match="layer_001.bin"):
        open_packed(packed)
    restore()
    os.truncate(packed / entry.file, entry.file_bytes - 1)
    with pytest.raises(PackedFormatError, match=r"layer_001.bin: 278527 bytes.*truncated"):
        open_packed(packed)
    restore()
    verify_packed(packed)


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
