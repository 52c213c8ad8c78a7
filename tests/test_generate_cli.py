"""`streamer generate` end to end: greedy tokens equal mlx-lm's on the same source checkpoint."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

mlx_lm = pytest.importorskip("mlx_lm")

PROMPT_IDS = [11, 400, 23, 7, 150, 300, 42, 5, 99, 18, 240, 3]
N_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for preset in ("like-397b", "mixed"):
        src = generate(root / f"{preset}-src", preset, dtype="float32", seed=5)
        dst = root / f"{preset}-packed"
        run_repack(make_plan(src, dst))
        out[preset] = (src, dst)
    return out


def _mlx_lm_greedy(src, ids, n):
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm.load(str(src))
    tokens = []
    for token, _ in generate_step(
        mx.array(ids), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    ):
        tokens.append(int(token))
    return tokens


def _until_eos(tokens: list[int], src) -> tuple[list[int], str]:
    """mlx-lm's greedy tokens cut where generation must stop: after the first end-of-sequence token
    (read from the checkpoint's generation_config.json), which is itself yielded."""
    eos = json.loads((src / "generation_config.json").read_text())["eos_token_id"]
    eos = {eos} if isinstance(eos, int) else set(eos)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], "stop"
    return tokens, "length"


def _run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("preset", ["like-397b", "mixed"])
@pytest.mark.parametrize(
    "flags",
    [
        ["--cache-experts", "10", "--prefetch", "off"],
        ["--cache-experts", "10", "--prefetch", "predict", "--io", "direct"],
        ["--cache-gb", "1", "--prefetch", "parallel"],
    ],
)
def test_greedy_tokens_equal_mlx_lm(models, preset, flags, tmp_path):
    src, dst = models[preset]
    ids = ",".join(map(str, PROMPT_IDS))
    # The min budget for `mixed` (two block shapes) is above 10 experts' mean: use cache-gb there.
    if preset == "mixed" and flags[0] == "--cache-experts":
        flags = ["--cache-experts", "24", *flags[2:]]
    out = _run("generate", str(dst), "--prompt-ids", ids, "-n", str(N_TOKENS), "--json", *flags)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want, reason = _until_eos(_mlx_lm_greedy(src, PROMPT_IDS, N_TOKENS), src)
    assert (got["token_ids"], got["stats"]["finish_reason"]) == (want, reason)
    for key in ("cache_hits", "cache_misses", "bytes_read", "prompt_tps", "decode_tps"):
        assert key in got["stats"]
    assert got["stats"]["bytes_read"] > 0


def test_trace_records_every_layer_of_every_token(models, tmp_path):
    _, dst = models["like-397b"]
    trace = tmp_path / "route.jsonl"
    _run("generate", str(dst), "--prompt-ids", "1,2,3,4", "-n", "3", "--trace", str(trace), "--json")
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    layers = 4
    # Prefill (1 step of 4 tokens) + 2 decode steps (the 3rd token needs no forward pass).
    assert len(rows) == 3 * layers
    assert [r["pos"] for r in rows[::layers]] == [0, 4, 5]
    assert all(len(r["experts"][0]) == 10 for r in rows)
    assert len(rows[0]["experts"]) == 4 and len(rows[-1]["experts"]) == 1


def test_checkpoint_dir_runs_with_resident_flag(models):
    src, _ = models["like-397b"]
    out = _run("generate", str(src), "--resident", "--prompt-ids", "1,2,3", "-n", "4", "--json")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["token_ids"] == _mlx_lm_greedy(src, [1, 2, 3], 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "99999999"], "outside the vocabulary"),
        (["--prompt", "   "], "empty"),
        (["--prompt", "a", "--prompt-ids", "1"], "exactly one"),
        (["--prompt", "a", "--cache-gb", "0.000001"], "cannot hold one layer"),
        (["--prompt", "a", "--cache-gb", "1", "--cache-experts", "4"], "not both"),
    ],
)
def test_bad_input_gives_one_clear_line(models, args, message):
    _, dst = models["like-397b"]
    result = CliRunner().invoke(main, ["generate", str(dst), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
