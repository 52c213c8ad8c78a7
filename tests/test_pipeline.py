"""Pipelined generation under ``mlx.launch`` (ring backend, loopback) gives one process's greedy tokens.

Also: how the layers are split, per-rank stats gathered to rank 0, and faults that end every rank with one
line (a rank that dies, a rank that stops answering) instead of a hang.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.distributed.split import parse_split, split_by_bytes, stage_costs
from streamer.errors import ConfigError, StreamerError
from streamer.storage.packed import open_packed
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

BIN = Path(sys.executable).parent
PROMPT = "5,77,301,12,9,44,500,3,18,250"
N_TOKENS = 10
LAUNCH_TIMEOUT_S = 120  # a launch takes seconds; a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A 4-layer float32 packed model (the "tiny" preset)."""
    root = tmp_path_factory.mktemp("pipeline")
    src = generate(root / "src", "tiny", dtype="float32", seed=11)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


def _single(packed, *flags) -> dict:
    result = CliRunner().invoke(main, ["generate", str(packed), "--prompt-ids", PROMPT, "-n", str(N_TOKENS),
                                       "--json", *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _free_port_base(ranks: int) -> int:
    """A port with ``ranks`` free ports from it (mlx.launch's ring listens on port + rank), below the
    ephemeral range: a port there can be taken by any outgoing connection between this check and the bind."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS's range starts at 49152
    for _ in range(50):
        base = random.randrange(10000, min(low, 49152) - ranks)
        try:
            for p in range(base, base + ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _launch(ranks: int, *args, env=None, timeout=LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``streamer ARGS`` on ``ranks`` ranks (ring backend, loopback)."""
    return _launch_command(ranks, [str(BIN / "streamer"), *args], env=env, timeout=timeout)


def _launch_command(
    ranks: int, command: list[str], env=None, timeout=LAUNCH_TIMEOUT_S, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """``command`` on ``ranks`` ranks under mlx.launch; ``stdin`` is written to the launcher (which passes
    it to every rank). A run past ``timeout`` fails the test with what the ranks printed."""
    launcher = BIN / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed with this mlx")
    port = _free_port_base(ranks)
    cmd = [str(launcher), "--backend", "ring", "-n", str(ranks), "--starting-port", str(port), "--", *command]
    # Its own session, so a run that hangs is ended with every rank the launcher started.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the ranks did not finish within {timeout} s (a hang):\n{out}{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch_generate(packed, ranks, *flags, env=None, timeout=LAUNCH_TIMEOUT_S):
    return _launch(ranks, "generate", str(packed), "--prompt-ids", PROMPT, "-n", str(N_TOKENS), "--json",
                   *flags, env=env, timeout=timeout)  # fmt: skip


# ---- the split ------------------------------------------------------------------------------------


def test_split_by_bytes_balances_the_largest_stage():
    assert split_by_bytes([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_by_bytes([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    # Rank 0 also holds the embedding and the head: it takes fewer layers.
    assert split_by_bytes([1, 1, 1, 1], 2, first_extra=2) == [range(0, 1), range(1, 4)]
    assert split_by_bytes([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_split_of_a_packed_model_covers_every_layer_once(packed):
    costs, rest = stage_costs(open_packed(packed))
    assert len(costs) == 4 and min(costs) > 0 and rest > 0
    stages = split_by_bytes(costs, 3, rest)
    assert [i for s in stages for i in s] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "text, message",
    [("2,x", "comma-separated layer counts"), ("4", "1 stages for 2 ranks"),
     ("1,2", "add up to the model's 4"), ("0,4", "at least one layer")],
)  # fmt: skip
def test_bad_split_names_the_flag(text, message):
    with pytest.raises(ConfigError, match="--pipeline-split") as e:
        parse_split(text, 4, 2)
    assert message in str(e.value)


def test_more_ranks_than_layers_is_one_clear_error():
    with pytest.raises(ConfigError, match="5 ranks but the model has 4 layers"):
        split_by_bytes([1, 1, 1, 1], 5)


def test_split_flag_outside_mlx_launch_is_refused(packed):
    result = CliRunner().invoke(
        main, ["generate", str(packed), "--prompt-ids", "1,2", "--pipeline-split", "2,2"]
    )
    assert result.exit_code != 0 and "under mlx.launch only" in result.output


# ---- tokens: ranks on loopback vs one process --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks, flags, split",
    [
        (2, ["--cache-experts", "8", "--io", "buffered"], []),  # the least cache: misses on every rank
        (2, ["--io", "direct"], ["--pipeline-split", "1,3"]),  # default cache (all experts fit), uneven
        (3, ["--cache-experts", "24", "--io", "direct"], []),
    ],
)
def test_ranks_give_one_process_greedy_tokens(packed, ranks, flags, split):
    want = _single(packed, *flags)
    run = _launch_generate(packed, ranks, *flags, *split)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout + run.stderr  # the answer is printed once, by rank 0
    got = json.loads(lines[0])
    assert got["token_ids"] == want["token_ids"]
    ranks_stats = got["stats"]["ranks"]
    assert [r["rank"] for r in ranks_stats] == list(range(ranks))
    covered = [i for r in ranks_stats for i in range(r["layers"][0], r["layers"][1] + 1)]
    assert covered == [0, 1, 2, 3]  # contiguous stages, every layer once
    if split:
        assert [r["layers"] for r in ranks_stats] == [[0, 0], [1, 3]]
    for key in ("cache_hits", "cache_misses", "bytes_read"):
        assert got["stats"][key] == sum(r[key] for r in ranks_stats)
    # Every rank routed every token through its own layers and read its own experts.
    for r in ranks_stats:
        layers = r["layers"][1] - r["layers"][0] + 1
        assert r["cache_hits"] + r["cache_misses"] >= layers * (N_TOKENS - 1)
        assert r["bytes_read"] > 0 and r["mb_read"] == r["bytes_read"] / 1e6
        assert 0 <= r["hit_rate"] <= 1
    if "--cache-experts" in flags:  # cache flags apply per rank, capped at the stage's own experts
        n = int(flags[flags.index("--cache-experts") + 1])
        slot = want["stats"]["cache_bytes"] // n  # every layer's experts are the same size here
        experts = open_packed(packed).manifest.layers[0].num_experts
        for r in ranks_stats:
            layers = r["layers"][1] - r["layers"][0] + 1
            assert r["cache_bytes"] == min(n, layers * experts) * slot


# ---- faults ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_others_with_one_line(packed):
    env = {**os.environ, "STREAMER_PIPELINE_FAULT": "1:3:exit"}
    run = _launch_generate(packed, 2, "--pipeline-timeout", "30", env=env, timeout=60)
    out = run.stdout + run.stderr
    assert "Traceback" not in out, out
    assert run.stdout.strip() == ""  # no answer printed
    # Rank 0's own line, or the launcher's when it stopped rank 0 first: both name rank 1 and the cause.
    assert "rank 0: lost the connection to rank 1" in out or "rank 1 exited with code 3" in out, out


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_others_within_the_timeout(packed):
    env = {**os.environ, "STREAMER_PIPELINE_FAULT": "1:3:hang"}
    # Long enough that loading on 2 busy cores never trips it before the fault does.
    run = _launch_generate(packed, 2, "--pipeline-timeout", "8", env=env, timeout=90)
    out = run.stdout + run.stderr
    assert "Traceback" not in out, out
    assert run.stdout.strip() == ""
    assert "rank 0: rank 1 did not answer within 8 s" in out, out


# ---- a stage holds only its own layers --------------------------------------------------------------


def test_a_stage_needs_only_its_own_expert_files(packed, tmp_path):
    from streamer.distributed.stage import load_stage
    from streamer.settings import RuntimeConfig

    copy = tmp_path / "stage1"
    copy.mkdir()
    manifest = open_packed(packed).manifest
    for f in packed.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(packed)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(packed)).symlink_to(f)
    for entry in manifest.layers[:2]:
        (copy / entry.file).unlink()  # another machine holds layers 0-1
    stage = load_stage(copy, RuntimeConfig(), range(2, 4), front=False)
    try:
        assert sorted(stage.runtime.store._fds) == [2, 3]
        assert stage.runtime.cache.capacity_bytes > 0
    finally:
        stage.close()
    with pytest.raises(StreamerError, match=manifest.layers[0].file):
        load_stage(copy, RuntimeConfig(), range(0, 2), front=True)  # names the missing file
