"""Each rank of an ``mlx.launch`` pipeline runs from its own directory holding only its stage's files
(``streamer repack --layers``): the answer is one process's on the whole copy; a rank whose copy lacks its
layers ends the run with one line naming them and the command that fixes it.

On loopback every rank gets the same MODEL argument, so the ranks run through ``sh -c`` to append their
own MLX_RANK: as if each machine held its copy at the same path.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from streamer.cli.main import main
from streamer.distributed.split import split_by_bytes, stage_costs
from streamer.storage.packed import open_packed
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate
from tests.test_pipeline import BIN, LAUNCH_TIMEOUT_S, PROMPT, _launch_command

N_TOKENS = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-files")
    src = generate(root / "src", "tiny", dtype="float32", seed=11)
    run_repack(make_plan(src, root / "whole"))
    return src, root


def _launch_per_rank_dirs(prefix, *flags, timeout=LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``streamer generate PREFIX<rank>`` on 2 ranks (ring backend, loopback)."""
    args = " ".join(["--prompt-ids", PROMPT, "-n", str(N_TOKENS), "--json", *flags])
    command = f'exec "{BIN / "streamer"}" generate "{prefix}$MLX_RANK" {args}'
    return _launch_command(2, ["sh", "-c", command], timeout=timeout)


@pytest.mark.slow
def test_each_rank_runs_from_its_own_stage_copy(source):
    src, root = source
    whole = root / "whole"
    costs, rest = stage_costs(open_packed(whole))
    stages = split_by_bytes(costs, 2, first_extra=rest)
    for rank, layers in enumerate(stages):
        run = CliRunner().invoke(main, ["repack", str(src), str(root / f"rank{rank}"), "--layers",
                                        f"{layers[0]}:{layers[-1]}"])  # fmt: skip
        assert run.exit_code == 0, run.output
    one = CliRunner().invoke(
        main, ["generate", str(whole), "--prompt-ids", PROMPT, "-n", str(N_TOKENS), "--json"]
    )
    assert one.exit_code == 0, one.output
    # No --pipeline-split: each rank splits by the bytes its own manifest records, and they must agree.
    run = _launch_per_rank_dirs(root / "rank")
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout + run.stderr
    got = json.loads(lines[0])
    assert got["token_ids"] == json.loads(one.output)["token_ids"]
    assert [r["layers"] for r in got["stats"]["ranks"]] == [[s[0], s[-1]] for s in stages]


@pytest.mark.slow
def test_a_rank_whose_copy_lacks_its_layers_ends_the_run_with_one_line(source):
    src, root = source
    run_repack(make_plan(src, root / "short0", "0:1"))
    run_repack(make_plan(src, root / "short1", "3:3"))  # --pipeline-split 2,2 gives rank 1 layers 2-3
    run = _launch_per_rank_dirs(
        root / "short", "--pipeline-split", "2,2", "--pipeline-timeout", "30", timeout=90
    )
    out = run.stdout + run.stderr
    assert "Traceback" not in out, out
    assert run.stdout.strip() == ""  # no answer
    line = next(line for line in out.splitlines() if "holds only layer 3 (" in line)
    assert "lacks layer 2" in line and f'"streamer repack SRC {root / "short1"} --layers 2:3"' in line, line
    assert "rank 1: " in line, line  # names the rank
