"""`serve`, `chat` and `bench` under ``mlx.launch`` (ring backend, loopback) answer as one process does.

`serve` is the demanding one: concurrent requests are batched (several sequences per model call, prompts
end to end), a follow-up resumes from the prefix cache, and ``n > 1`` forks a sequence's state, so every
rank must keep each sequence's and each snapshot's state for its layers exactly as rank 0 asks. Each test
compares the pipelined answers with the same requests to one process (greedy, float32).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_pipeline import (  # noqa: F401
    BIN,
    LAUNCH_TIMEOUT_S,
    _free_port_base,
    _launch,
    _launch_command,
    packed,
)
from tests.test_serve_sigint import Serve

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os\nimport", "class Stack:\n    def", "for i in range(10):"]


class Server(Serve):
    """`streamer serve` as one process or as ``ranks`` ranks under mlx.launch, in a session of its own."""

    def __init__(self, packed: Path, tmp_path: Path, ranks: int = 1, *flags: str):
        serve = [str(BIN / "streamer"), "serve", str(packed), "--port", "0", "--served-model-name", "tiny",
                 "--max-batch", "4", *flags]  # fmt: skip
        if ranks > 1:
            launcher = BIN / "mlx.launch"
            if not launcher.exists():
                pytest.skip("mlx.launch is not installed with this mlx")
            port = _free_port_base(ranks)
            serve = [str(launcher), "--backend", "ring", "-n", str(ranks), "--starting-port", str(port),
                     "--", *serve]  # fmt: skip
        super().__init__(packed, tmp_path, serve, start_new_session=True)

    def wait_listening(self, timeout: float = LAUNCH_TIMEOUT_S) -> None:
        assert self._listening.wait(timeout), "serve did not start: " + self.stderr
        assert self.url, f"serve exited ({self.proc.poll()}) before listening: " + self.stderr

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=LAUNCH_TIMEOUT_S) as r:
            return json.load(r)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=LAUNCH_TIMEOUT_S) as r:
            return json.load(r)

    def interrupt(self, timeout: float = 90) -> int:
        """Ctrl-C as a terminal sends it: to every process of the group (the launcher and each rank)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _tracebacks_of_ours(err: str) -> list[str]:
    """The tracebacks in ``err`` not from mlx.launch itself (its main loop does not catch the Ctrl-C that
    reaches it with the ranks, so it may print one of its own, whatever the ranks do)."""
    blocks = err.split("Traceback (most recent call last):")[1:]
    return [
        b for b in blocks if "_distributed_utils/launch.py" not in b or re.search(r'File "[^"]*/streamer/', b)
    ]


def _completion(prompt: str, n: int = 1) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "n": n}


def _chat(messages: list[dict]) -> dict:
    return {"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0}


def _session(server: Server) -> dict:
    """Concurrent completions (batched), a two-turn chat (the second resumes from a snapshot), n = 2."""
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(server.post, "/v1/completions", _completion(p)) for p in PROMPTS]
        batched = [f.result()["choices"][0]["text"] for f in futures]
    first = [{"role": "user", "content": "hello there"}]
    answer = server.post("/v1/chat/completions", _chat(first))["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    follow = server.post("/v1/chat/completions", _chat(second))["choices"][0]["message"]["content"]
    forked = [c["text"] for c in server.post("/v1/completions", _completion(PROMPTS[0], n=2))["choices"]]
    return {"batched": batched, "chat": [answer, follow], "forked": forked}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])  # with 3, a middle rank passes each call's descriptor on
def test_serve_across_ranks_answers_as_one_process(packed, tmp_path, ranks):  # noqa: F811
    ranks_wanted = ranks
    one = Server(packed, tmp_path / "one")
    # A bounded wait on peers: whatever Ctrl-C interrupts, every rank ends within it.
    two = Server(packed, tmp_path / "two", ranks, "--pipeline-timeout", "30")
    try:
        one.wait_listening()
        want = _session(one)
        two.wait_listening()
        got = _session(two)
        two.post("/v1/completions", _completion("x"))
        # /v1/stats shows the ranks as the last request ended, which the worker records just after its
        # answer has gone: poll (bounded) until every rank forgot the sequences before it.
        deadline = time.monotonic() + 30
        while True:
            stats = two.get("/v1/stats")
            held = [r["sequences_held"] for r in stats["experts"]["ranks"][1:]]
            if max(held) <= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == want
        assert stats["batch"]["largest_batch"] > 1  # the concurrent requests really were batched
        assert stats["prefix_cache"]["hits"] >= 1  # the follow-up resumed from a snapshot on every rank
        ranks = stats["experts"]["ranks"]
        assert len(ranks) == ranks_wanted
        assert [r["rank"] for r in ranks] == list(range(len(ranks)))
        assert all(r["cache_hits"] + r["cache_misses"] > 0 for r in ranks)
        # The other ranks forgot every finished sequence (all but the last request's, which was ending);
        # they keep only the snapshots rank 0's prefix cache holds.
        assert max(held) <= 1, held
        for r in ranks[1:]:
            assert 1 <= r["snapshots_held"] <= stats["prefix_cache"]["entries"]
        code = two.interrupt()
        err = "".join(two.lines)
        assert code == 130 or "exited with code 130" in err, err  # rank 0 ends as one process does
        assert not _tracebacks_of_ours(err), err
    finally:
        one.kill()
        two.kill()


def _chat_run(packed: Path, ranks: int, stdin: str) -> subprocess.CompletedProcess:
    flags = ["chat", str(packed), "--no-think", "--temp", "0", "-n", "8"]
    if ranks == 1:
        return subprocess.run([str(BIN / "streamer"), *flags], input=stdin, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)  # fmt: skip
    # mlx.launch forwards its stdin to every rank but never closes theirs: the input ends with /quit.
    return _launch_command(ranks, [str(BIN / "streamer"), *flags], stdin=stdin)


@pytest.mark.slow
def test_chat_across_two_ranks_answers_as_one_process(packed):  # noqa: F811
    stdin = "hello there\nand then?\n/save here\n/stats\n/quit\n"
    want = _chat_run(packed, 1, stdin)
    got = _chat_run(packed, 2, stdin)
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and got.stdout.count("\n") >= 2  # two answers, as one process
    assert "Traceback" not in got.stderr, got.stderr
    assert "sessions are saved and loaded on one process" in got.stderr  # /save says why, loses nothing
    assert re.search(r"\n  rank 1 \(layers \d-3\): expert cache", got.stderr)  # /stats: a line per rank


@pytest.mark.slow
def test_bench_across_two_ranks_batches_and_reports_every_rank(packed):  # noqa: F811
    run = _launch(2, "bench", str(packed), "--prompt-tokens", "20", "-n", "6", "--concurrency", "3",
                  "--no-disk-test", "--json", "--pipeline-split", "1,3")  # fmt: skip
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    assert result["decode"]["tokens"] == 3 * 5  # three streams, five decode steps each
    assert [r["layers"] for r in result["ranks"]] == [[0, 0], [1, 3]]  # (rank 0 holds the head too)
    trace = _launch(2, "bench", str(packed), "--trace", "t.jsonl", "--no-disk-test")
    # (mlx.launch exits 0 whatever its ranks do: the line is what tells)
    assert "--trace runs on one process, not under mlx.launch" in trace.stderr, trace.stderr
    assert "Traceback" not in trace.stderr and not Path("t.jsonl").exists()


@pytest.mark.slow
def test_generate_stats_has_a_line_per_rank(packed):  # noqa: F811
    run = _launch(2, "generate", str(packed), "--prompt-ids", "5,6,7", "-n", "4", "--stats")
    lines = [line for line in run.stderr.splitlines() if line.startswith("rank ")]
    assert [line.split(" (")[0] for line in lines] == ["rank 0", "rank 1"], run.stderr
    assert "(layers 2-3): expert cache" in lines[1] and "waited on the other ranks" in lines[1]


def test_pipeline_state_survives_ids_being_freed():
    """The serving side's table: unknown ids get fresh caches, freed ids and snapshots go, a restore
    gives a sequence a copy of the snapshot (not the snapshot's own buffers)."""
    import mlx.core as mx

    from streamer.distributed.pipeline import StageState
    from streamer.models.layer_cache import DeltaNetCache, KVCache

    class FakeStage:
        def make_cache(self):
            return [KVCache(), DeltaNetCache()]

    state = StageState(FakeStage())
    kv, dn = state.caches_of(7)
    assert state.caches_of(7)[0] is kv  # the same sequence's caches each time
    kv.update_and_fetch(mx.ones((1, 1, 3, 2)), mx.ones((1, 1, 3, 2)))
    dn.update(mx.zeros((1, 2, 4)), mx.ones((1, 1, 2, 2)), 3)
    assert state.snapshot(7, 8) == 3 * 2 * 4 * 2 + (2 * 4 + 4) * 4  # KV copies + DeltaNet state, bytes
    kv.update_and_fetch(mx.full((1, 1, 1, 2), 5.0), mx.full((1, 1, 1, 2), 5.0))  # the sequence goes on
    state.restore(9, 8)
    restored = state.caches_of(9)
    assert restored[0].offset == 3 and restored[1].offset == 3
    assert mx.array_equal(restored[0].keys[..., :3, :], mx.ones((1, 1, 3, 2)))
    restored[0].update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
    state.restore(10, 8)  # the snapshot is unchanged by the restored sequence's own steps
    assert state.caches_of(10)[0].offset == 3
    state.free({"free": [7, 9], "free_snaps": [8]})
    assert set(state.caches) == {10} and not state.snaps


@pytest.mark.slow
def test_serve_ends_with_one_line_when_a_rank_dies(packed, tmp_path):  # noqa: F811
    os.environ["STREAMER_PIPELINE_FAULT"] = "1:2:exit"  # rank 1 dies at its second model call
    try:
        two = Server(packed, tmp_path, 2, "--pipeline-timeout", "30")
    finally:
        del os.environ["STREAMER_PIPELINE_FAULT"]
    try:
        two.wait_listening()
        with pytest.raises(OSError):  # the request's connection closes: the server is gone
            two.post("/v1/completions", _completion(PROMPTS[0]))
        two.proc.wait(60)  # ends by itself, within a bounded time
        err = "".join(two.lines)
        assert "Traceback" not in err, err
        assert "rank 0: lost the connection to rank 1" in err or "rank 1 exited with code 3" in err, err
    finally:
        two.kill()


@pytest.mark.slow
def test_preload_fills_every_ranks_cache(packed):  # noqa: F811
    flags = ["--prompt-ids", "5,6,7", "-n", "4", "--json", "--preload", "all"]
    run = _launch(2, "generate", str(packed), *flags)
    assert "Traceback" not in run.stderr, run.stderr
    ranks = json.loads(run.stdout)["stats"]["ranks"]
    # Every expert of every stage fits this model's default cache: preloaded, no lookup misses.
    assert [r["cache_misses"] for r in ranks] == [0, 0] and all(r["cache_hits"] > 0 for r in ranks), ranks
