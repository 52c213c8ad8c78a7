"""A packed copy damaged after it was written (64 bytes overwritten inside an expert block).

With ``--verify-reads`` every expert block read is checked against the manifest's CRC-32,
so `generate` fails with one line naming file, layer, expert and component instead of answering wrong;
`streamer repack SRC DST` re-checks a complete copy before saying "already packed" and repairs it in
place. Without it (the default: it costs 13-28 % of decode time while 7 MB blocks stream, see
settings.RuntimeConfig.verify_reads) the old behaviour stays on purpose: exit 0, no warning, a wrong
answer; the repack re-check and `streamer verify` are then what finds the damage.
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.experts.store import ExpertChecksumError, ExpertStore
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine
from streamer.settings import RuntimeConfig
from streamer.storage.packed import open_packed, read_manifest
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.verify import verify_packed
from streamer.synthetic.writer import generate

CACHE = ["--cache-experts", "6"]  # 6 slots for 4 layers x 16 experts: decode keeps reading
PROMPT = [7, 8, 9]
GENERATE = ["--prompt-ids", ",".join(map(str, PROMPT)), "-n", "20", *CACHE]
VERIFY = [*GENERATE, "--verify-reads"]
COMPONENTS = [f"{p}_proj.{k}" for p in ("gate", "up", "down") for k in ("weight", "scales", "biases")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(source checkpoint, its packed copy, the packed copy's files), built once, never damaged."""
    root = tmp_path_factory.mktemp("damaged")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return src, root / "packed", _tree(root / "packed")


@pytest.fixture(scope="module")
def clean(pristine):
    """The undamaged copy's `generate` output and the (layer, expert) pairs that run reads."""
    _, packed, _ = pristine
    result = CliRunner().invoke(main, ["generate", str(packed), *GENERATE])
    assert result.exit_code == 0, result.output
    routed = []
    with load_engine(packed, RuntimeConfig(cache_experts=6)) as engine:
        engine.runtime.on_route = lambda layer, ids: routed.extend((layer, int(e)) for e in ids.reshape(-1))
        sampler = make_sampler(SamplingParams())
        list(stream_generate(engine.model, engine.tokenizer, PROMPT, sampler, 20))
    return result.output, routed


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(pristine, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(pristine[1], dst)
    return dst


def _overwrite(packed, layer: int, expert: int, component: str, at: int = 100, fill: int = 0xFF) -> None:
    """Overwrites 64 bytes of one expert's component (from byte ``at`` of it, kept inside it)."""
    entry = read_manifest(packed).layers[layer]
    c = entry.component(component)
    at = min(at, c.nbytes - 64)
    with open(packed / entry.file, "r+b") as f:
        f.seek(entry.block_offset(expert) + c.offset + at)
        f.write(bytes([fill]) * 64)


def test_generate_fails_with_one_line_naming_layer_expert_and_repack_repairs(pristine, clean, tmp_path):
    src, _, want = pristine
    clean_output, routed = clean
    layer, expert = routed[len(routed) // 2]  # an expert this very run reads
    dst = _copy(pristine, tmp_path)
    _overwrite(dst, layer, expert, "up_proj.scales")
    open_packed(dst)  # sizes and headers are intact: only the bytes show the damage

    result = CliRunner().invoke(main, ["generate", str(dst), *VERIFY])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    last = result.output.splitlines()[-1]
    assert last.count("Error: ") == 1  # after the tokens streamed so far (stdout), one line on stderr
    last = last[last.index("Error: ") :]
    assert last.startswith(f"Error: {dst}/experts/layer_{layer:03d}.bin: layer {layer} expert {expert} ")
    assert "component up_proj.scales: checksum mismatch" in last
    assert f'"streamer repack SRC {dst}"' in last and f"streamer verify {dst}" in last

    # Without --verify-reads (the default) the old behaviour: exit 0, no warning, a different (wrong) answer.
    silent = CliRunner().invoke(main, ["generate", str(dst), *GENERATE])
    assert (
        silent.output
        == CliRunner().invoke(main, ["generate", str(dst), *GENERATE, "--no-verify-reads"]).output
    )
    assert silent.exit_code == 0, silent.output
    assert "checksum" not in silent.output and "Error" not in silent.output
    assert silent.output != clean_output

    repaired = CliRunner().invoke(main, ["repack", str(src), str(dst)])
    assert repaired.exit_code == 0, repaired.output
    assert "repaired" in repaired.output and "already packed" not in repaired.output
    assert _tree(dst) == want
    again = CliRunner().invoke(main, ["generate", str(dst), *VERIFY])
    assert again.exit_code == 0 and again.output == clean_output
    still = CliRunner().invoke(main, ["repack", str(src), str(dst)])
    assert still.exit_code == 0 and "already packed" in still.output and "re-checked" in still.output


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_of_the_last_expert_is_caught_on_read_and_repaired(pristine, tmp_path, component):
    src, _, want = pristine
    dst = _copy(pristine, tmp_path)
    entry = read_manifest(dst).layers[2]
    last = entry.num_experts - 1
    _overwrite(dst, 2, last, component, at=0 if component.endswith("biases") else 100, fill=0xA5)
    packed = open_packed(dst)
    buffers = [memoryview(bytearray(c.nbytes)) for c in entry.components]
    store = ExpertStore(packed)
    try:
        store.read_block(2, last - 1, buffers)  # the neighbour is intact
        with pytest.raises(
            ExpertChecksumError,
            match=rf"layer_002.bin: layer 2 expert {last} component {component}: checksum",
        ):
            store.read_block(2, last, buffers)
    finally:
        store.close()
    off = ExpertStore(packed, verify=False)
    try:
        off.read_block(2, last, buffers)  # reads happily: verify off checks nothing
    finally:
        off.close()

    result = run_repack(make_plan(src, dst))
    assert result.status == "repaired" and _tree(dst) == want
    verify_packed(dst)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_both_io_modes_verify(pristine, tmp_path, io_mode):
    dst = _copy(pristine, tmp_path)
    _overwrite(dst, 0, 0, "gate_proj.weight")
    packed = open_packed(dst)
    entry = packed.manifest.layers[0]
    try:
        store = ExpertStore(packed, io_mode)
    except Exception as e:  # tmpfs refuses O_DIRECT
        pytest.skip(str(e))
    buffers = [memoryview(bytearray(c.nbytes)) for c in entry.components]
    try:
        with pytest.raises(ExpertChecksumError, match="layer 0 expert 0 component gate_proj.weight"):
            store.read_block(0, 0, buffers)
        store.read_block(0, 1, buffers)
    finally:
        store.close()


def test_repack_rechecks_the_resident_file_and_copied_files(pristine, tmp_path):
    src, _, want = pristine
    dst = _copy(pristine, tmp_path)
    data = bytearray((dst / "resident.safetensors").read_bytes())
    data[-200:-136] = b"\xff" * 64  # inside the last tensor's data: the header still parses
    (dst / "resident.safetensors").write_bytes(bytes(data))
    open_packed(dst)
    result = run_repack(make_plan(src, dst))
    assert result.status == "repaired" and _tree(dst) == want

    config = bytearray((dst / "config.json").read_bytes())
    config[2:4] = b"##"  # same size
    (dst / "config.json").write_bytes(bytes(config))
    assert run_repack(make_plan(src, dst)).status == "repaired" and _tree(dst) == want
    assert run_repack(make_plan(src, dst)).status == "already packed"


def test_verify_reads_flag_reaches_the_store(pristine):
    _, packed, _ = pristine
    for flag, want in ((True, True), (False, False)):
        with load_engine(packed, RuntimeConfig(cache_experts=6, verify_reads=flag)) as engine:
            assert engine.runtime.store.verify is want
    assert RuntimeConfig().verify_reads is False  # the measured default (settings.py)
