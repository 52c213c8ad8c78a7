"""The catalogue of user mistakes and damaged inputs: each gives one clear line through the real CLI.

Every row runs a `streamer` command on a checkpoint, packed model or flag value that is wrong in one way
and checks the answer: a non-zero exit (or, in chat, a note and the chat goes on), no traceback, and a
message that names the thing that is wrong and says what fixes it. The table is the catalogue; the
README's reliability section quotes its size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.storage.packed import read_manifest
from streamer.storage.packed_format import MANIFEST_FILE, PROGRESS_FILE, RESIDENT_FILE
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.safetensors_file import read_header
from streamer.synthetic.presets import get_preset
from streamer.synthetic.writer import generate

SMALL_CONTEXT = 48  # max_position_embeddings of the "short" model


@dataclass
class Models:
    """Pristine inputs, built once; cases damage copies of them."""

    src: Path  # a multi-shard tiny checkpoint
    packed: Path  # its packed copy
    short: Path  # a packed tiny model whose context is SMALL_CONTEXT tokens
    work: Path  # where this case's copies go

    def copy(self, which: str) -> Path:
        dst = self.work / which
        shutil.copytree(getattr(self, which), dst)
        return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("catalogue")
    src = generate(root / "src", "tiny", dtype="float32", max_shard_bytes=256 << 10)
    run_repack(make_plan(src, root / "packed"))
    tiny = get_preset("tiny")
    short = dataclasses.replace(
        tiny, text_config={**tiny.text_config, "max_position_embeddings": SMALL_CONTEXT}
    )
    run_repack(make_plan(generate(root / "short-src", short, dtype="float32"), root / "short"))
    return Models(src, root / "packed", root / "short", root)


@pytest.fixture
def models(built, tmp_path, monkeypatch) -> Models:
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    return dataclasses.replace(built, work=tmp_path)


# ----------------------------------------------------------------------------------------------------
# Damage, one kind per function: each takes Models and returns the command's arguments.


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


def truncated_shard(m: Models) -> list:
    src = m.copy("src")
    shard = _shards(src)[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    return ["repack", src, m.work / "out"]


def missing_shard(m: Models) -> list:
    src = m.copy("src")
    _shards(src)[0].unlink()
    return ["repack", src, m.work / "out"]


def index_names_missing_tensor(m: Models) -> list:
    src = m.copy("src")
    shard = _shards(src)[0].name
    _edit_json(
        src / "model.safetensors.index.json", lambda d: d["weight_map"].update({"extra.weight": shard})
    )
    return ["repack", src, m.work / "out"]


def _rewrite_header(shard: Path, edit) -> None:
    """Edits a shard's safetensors header in place (same length, padded with spaces)."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    shard.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n :])


def _shard_holding(src: Path, name: str) -> Path:
    return next(shard for shard in _shards(src) if name in read_header(shard)[0])


def wrong_dtype(m: Models) -> list:
    src = m.copy("src")
    name = "language_model.model.layers.0.mlp.switch_mlp.up_proj.weight"
    _rewrite_header(_shard_holding(src, name), lambda h: h[name].update(dtype="I32"))
    return ["repack", src, m.work / "out"]


def wrong_shape(m: Models) -> list:
    src = m.copy("src")
    name = "language_model.model.layers.2.mlp.switch_mlp.gate_proj.weight"

    def swap(h):
        e, o, i = h[name]["shape"]
        h[name]["shape"] = [e, i, o]  # same bytes, transposed: the header still fits the file

    _rewrite_header(_shard_holding(src, name), swap)
    return ["repack", src, m.work / "out"]


def unknown_model_type(m: Models) -> list:
    src = m.copy("src")
    _edit_json(src / "config.json", lambda d: d.update(model_type="llama"))
    return ["repack", src, m.work / "out"]


def config_without_text_fields(m: Models) -> list:
    src = m.copy("src")
    _edit_json(src / "config.json", lambda d: d.update(text_config={"model_type": "qwen3_5_moe_text"}))
    return ["repack", src, m.work / "out"]


def config_missing_one_field(m: Models) -> list:
    src = m.copy("src")  # caught before repack writes anything, not when the packed model is first run
    _edit_json(src / "config.json", lambda d: d["text_config"].pop("num_attention_heads"))
    return ["repack", src, m.work / "out"]


def config_not_json(m: Models) -> list:
    src = m.copy("src")
    (src / "config.json").write_text('{"model_type": ')
    return ["repack", src, m.work / "out"]


def not_a_checkpoint(m: Models) -> list:
    (m.work / "photos").mkdir()
    (m.work / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return ["repack", m.work / "photos", m.work / "out"]


def no_such_directory(m: Models) -> list:
    return ["generate", m.work / "nowhere", "-p", "hi"]


def source_not_packed(m: Models) -> list:
    return ["chat", m.src]


def corrupted_expert_block(m: Models) -> list:
    packed = m.copy("packed")
    entry = read_manifest(packed).layers[2]
    at = entry.block_offset(5) + entry.component("up_proj.scales").offset + 3
    with open(packed / entry.file, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    return ["verify", packed]


def truncated_layer_generate(m: Models) -> list:
    packed = m.copy("packed")
    os.truncate(packed / "experts" / "layer_002.bin", 30000)
    return ["generate", packed, "-p", "hi"]


def truncated_layer_chat(m: Models) -> list:
    packed = m.copy("packed")
    os.truncate(packed / "experts" / "layer_001.bin", 20000)
    return ["chat", packed]


def manifest_other_version(m: Models) -> list:
    packed = m.copy("packed")
    _edit_json(packed / MANIFEST_FILE, lambda d: d.update(version=2))
    return ["generate", packed, "-p", "hi"]


def manifest_not_json(m: Models) -> list:
    packed = m.copy("packed")
    (packed / MANIFEST_FILE).write_bytes(b'{"format": "streamer-packed", \xff')
    return ["info", packed]


def manifest_table_not_the_files(m: Models) -> list:
    packed = m.copy("packed")
    rename = {"name": "gate_proj.scalez"}  # the layer file's header still says gate_proj.scales
    _edit_json(packed / MANIFEST_FILE, lambda d: d["layers"][0]["components"][1].update(rename))
    return ["generate", packed, "-p", "hi"]


def manifest_other_tensors(m: Models) -> list:
    packed = m.copy("packed")
    _edit_json(packed / MANIFEST_FILE, lambda d: d["resident"]["crc32"].update({"extra.weight": "00000000"}))
    return ["generate", packed, "-p", "hi"]


def manifest_other_model(m: Models) -> list:
    packed = m.copy("packed")
    _edit_json(packed / MANIFEST_FILE, lambda d: d["layers"].pop())
    return ["generate", packed, "-p", "hi"]


def packed_config_damaged(m: Models) -> list:
    packed = m.copy("packed")
    size = (packed / "config.json").stat().st_size
    (packed / "config.json").write_bytes(b"\0" * size)  # same size: only its bytes are wrong
    return ["generate", packed, "-p", "hi"]


def resident_file_damaged(m: Models) -> list:
    packed = m.copy("packed")
    os.truncate(packed / RESIDENT_FILE, 1000)
    return ["serve", packed, "--port", "0"]


def interrupted_repack(m: Models) -> list:
    packed = m.copy("packed")
    (packed / MANIFEST_FILE).unlink()
    (packed / PROGRESS_FILE).write_text(json.dumps({"source": {"name": "src"}}))
    return ["generate", packed, "-p", "hi"]


def _generate(m: Models, *args) -> list:
    return ["generate", m.packed, "-n", "2", *args]


@dataclass
class Case:
    """One row: the command ``make`` sets up, and the words its message must contain."""

    name: str
    make: Callable[[Models], list]
    expect: tuple[str, ...]  # the thing that is wrong ... and the fix
    outcome: str = "error"  # "error": exit 1, "usage": click's exit 2, "note": chat goes on (exit 0)
    stdin: bytes | None = None


CATALOGUE = [
    # ---- source checkpoints (streamer repack) ------------------------------------------------------
    Case("truncated shard", truncated_shard, ("model-00006-of-00006.safetensors", "truncated", "again")),
    Case("missing shard", missing_shard, ("shard model-00001-of-00006.safetensors", "missing", "download")),
    Case(
        "index names a missing tensor",
        index_names_missing_tensor,
        ("places tensor 'extra.weight'", "download both again"),
    ),
    Case("wrong dtype", wrong_dtype, ("up_proj.weight' has unexpected dtype I32", "download the checkpoint")),
    Case("wrong shape", wrong_shape, ("gate_proj.weight' has shape [16, 16, 64]", "do not match config")),
    Case("unknown model_type", unknown_model_type, ("model_type 'llama'", "Qwen3.5")),
    Case(
        "config without text_config fields",
        config_without_text_fields,
        ("config.json: missing or non-integer hidden_size", "re-download config.json"),
    ),
    Case(
        "config missing one field",
        config_missing_one_field,
        ("num_attention_heads", "re-download config.json"),
    ),
    Case("config.json not JSON", config_not_json, ("config.json: not valid JSON", "re-download")),
    Case(
        "not a checkpoint", not_a_checkpoint, ("photos: not a checkpoint (no config.json)", "mlx-community")
    ),
    Case("no such directory", no_such_directory, ("nowhere: no such directory", "Hugging Face id")),
    Case("source not packed yet", source_not_packed, ("is not packed yet", 'run "streamer repack')),
    # ---- packed models -----------------------------------------------------------------------------
    Case(
        "corrupted expert block (verify)",
        corrupted_expert_block,
        ("layer 2 expert 5 component up_proj.scales: checksum mismatch", "rewrite", "streamer repack SRC"),
    ),
    Case(
        "truncated layer file (generate)",
        truncated_layer_generate,
        ("layer_002.bin: 30000 bytes", "rewrite the damaged files", "streamer repack SRC"),
    ),
    Case(
        "truncated layer file (chat)",
        truncated_layer_chat,
        ("layer_001.bin: 20000 bytes", "rewrite the damaged files"),
    ),
    Case(
        "manifest from another version",
        manifest_other_version,
        ("packed format version 2", "use the streamer that wrote it", 'run "streamer repack" again'),
    ),
    Case("manifest not JSON", manifest_not_json, ("manifest.json: not valid JSON", "delete")),
    Case(
        "manifest table does not match the files",
        manifest_table_not_the_files,
        ("layer_000.bin: header component table differs", "rewrite the damaged files"),
    ),
    Case(
        "manifest names other resident tensors",
        manifest_other_tensors,
        ("resident.safetensors: tensors differ from the manifest", "rewrite the damaged files"),
    ),
    Case(
        "manifest of another model",
        manifest_other_model,
        ("3 expert layers, config.json says num_hidden_layers=4", "repack the checkpoint into a new"),
    ),
    Case(
        "packed config.json damaged",
        packed_config_damaged,
        ("config.json: not valid JSON", "rewrite", "rewrites only damaged ones"),
    ),
    Case(
        "truncated resident file (serve)",
        resident_file_damaged,
        ("resident.safetensors: 1000 bytes", "rewrite the damaged files"),
    ),
    Case(
        "interrupted repack",
        interrupted_repack,
        ("interrupted and is incomplete", "streamer repack SRC", "'src' checkpoint) to resume it"),
    ),
    # ---- prompts -----------------------------------------------------------------------------------
    Case("empty prompt", lambda m: _generate(m, "-p", "  "), ("--prompt is empty", "pass some text")),
    Case(
        "non-UTF-8 prompt",
        lambda m: _generate(m, "-p", "caf\udce9"),  # how Python hands over argv bytes that are not UTF-8
        ("--prompt is not valid UTF-8", "encoding"),
    ),
    Case(
        "prompt longer than the context",
        lambda m: ["generate", m.short, "-p", "lorem ipsum " * 40],
        (f"model's context of {SMALL_CONTEXT} tokens", "shorten the prompt or lower --max-tokens"),
    ),
    Case(
        "prompt ids outside the vocabulary",
        lambda m: _generate(m, "--prompt-ids", "1,99999"),
        ("id 99999 is outside the vocabulary (size 576)",),
    ),
    Case("negative prompt ids", lambda m: _generate(m, "--prompt-ids", "3,-1"), ("--prompt-ids", "negative")),
    Case(
        "non-UTF-8 chat message",
        lambda m: ["chat", m.packed, "-n", "1"],
        ("not valid UTF-8", "ignored"),
        "note",
        b"caf\xe9\n",
    ),
    Case(
        "conversation longer than the context",
        lambda m: ["chat", m.short, "-n", "1"],
        (f"the model's context is {SMALL_CONTEXT}", "/reset"),
        "note",
        b"lorem ipsum " * 40 + b"\n",
    ),
    Case(
        "unknown chat command",
        lambda m: ["chat", m.packed],
        ("unknown command /frobnicate", "/help"),
        "note",
        b"/frobnicate\n",
    ),
    # ---- flag values -------------------------------------------------------------------------------
    Case("negative cache", lambda m: _generate(m, "-p", "hi", "--cache-gb", "-1"), ("--cache-gb must be",)),
    Case("NaN cache", lambda m: _generate(m, "-p", "hi", "--cache-gb", "nan"), ("--cache-gb must be",)),
    Case(
        "cache below one layer's top-k",
        lambda m: _generate(m, "-p", "hi", "--cache-gb", "0.00001"),
        ("cannot hold one layer's top-4 experts", "raise --cache-gb"),
    ),
    Case(
        "zero cache experts", lambda m: _generate(m, "-p", "hi", "--cache-experts", "0"), ("--cache-experts",)
    ),
    Case(
        "both cache flags",
        lambda m: _generate(m, "-p", "hi", "--cache-gb", "1", "--cache-experts", "8"),
        ("--cache-gb or --cache-experts, not both",),
    ),
    Case(
        "zero threads",
        lambda m: _generate(m, "-p", "hi", "--threads", "0"),
        ("--threads must be at least 1",),
    ),
    Case(
        "zero I/O timeout", lambda m: _generate(m, "-p", "hi", "--io-timeout", "0"), ("--io-timeout must be",)
    ),
    Case("NaN temperature", lambda m: ["chat", m.packed, "--temp", "nan"], ("temperature must be a finite",)),
    Case("negative seed", lambda m: _generate(m, "-p", "hi", "--seed", "-1"), ("'--seed'",), "usage"),
    Case(
        "zero max tokens",
        lambda m: _generate(m, "-p", "hi", "--max-tokens", "0"),
        ("'--max-tokens'",),
        "usage",
    ),
    Case("unknown I/O mode", lambda m: _generate(m, "-p", "hi", "--io", "fast"), ("'--io'",), "usage"),
    Case(
        "trace file in a missing directory",
        lambda m: _generate(m, "-p", "hi", "--trace", m.work / "no" / "t.jsonl"),
        ("--trace: cannot write", "No such file or directory"),
    ),
    Case("port out of range", lambda m: ["serve", m.packed, "--port", "70000"], ("'--port'",), "usage"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_catalogue(models, case):
    args = [str(a) for a in case.make(models)]
    result = CliRunner().invoke(main, args, input=case.stdin)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{case.name}: {type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if any(word in line for word in case.expect)]
    assert lines, f"{case.name}: no line names {case.expect}; got:\n{output}"
    line = lines[-1]
    for word in case.expect:
        assert word in line, f"{case.name}: {word!r} not in {line!r}"
    if case.outcome == "note":
        assert result.exit_code == 0, output
    else:
        assert result.exit_code == (2 if case.outcome == "usage" else 1), output
        assert line.startswith("Error: ") and output.rstrip("\n").endswith(line), output
        if case.outcome == "error":  # one line, not one line among others (usage errors add click's usage)
            assert [x for x in output.splitlines() if x.strip()] == [line], output
    if args[0] == "repack":
        assert not (models.work / "out" / MANIFEST_FILE).exists()  # nothing that looks complete


def test_the_real_entry_point_prints_one_line(built, tmp_path):
    """Through the installed script, as a user runs it: argv bytes that are not UTF-8, a damaged file."""
    script = os.path.join(os.path.dirname(sys.executable), "streamer")
    env = {**os.environ, "STREAMER_HOME": str(tmp_path / "home")}
    bad = subprocess.run(
        [script, "generate", str(built.packed), "-p", b"caf\xe9"], capture_output=True, env=env
    )
    assert bad.returncode == 1 and bad.stdout == b""
    assert bad.stderr.decode().splitlines() == [
        "Error: --prompt is not valid UTF-8 (at character 3); check the terminal's or file's encoding"
    ]
    packed = tmp_path / "packed"
    shutil.copytree(built.packed, packed)
    os.truncate(packed / "experts" / "layer_003.bin", 16384)
    bad = subprocess.run([script, "chat", str(packed)], capture_output=True, env=env, input=b"hi\n")
    (line,) = bad.stderr.decode().splitlines()
    assert bad.returncode == 1 and line.startswith(f"Error: {packed}/experts/layer_003.bin: 16384 bytes")
