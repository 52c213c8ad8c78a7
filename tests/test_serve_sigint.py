"""Ctrl-C on `streamer serve` exits 130 with one clean line, idle or after a request, every time.

The failure this guards against was a race (about 4 runs in 10): the generation thread's MLX
thread-local random key was freed by a C++ destructor after ``Thread.join`` had returned, while the main
thread was already finalizing the interpreter; taking the GIL there aborted the process with
"terminate called without an active exception" (SIGABRT, exit -6). One start cannot show a race, so
the test starts the server several times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

REPO = Path(__file__).resolve().parents[1]
STREAMER = [sys.executable, "-c", "from streamer.cli.main import main; main()"]
STARTS = 8


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-sigint")
    src = generate(root / "src", "tiny", dtype="float32", seed=3)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


class Serve:
    """`streamer serve` in a subprocess; a thread collects stderr and spots the listening URL.

    ``command`` replaces the plain ``streamer serve PACKED`` (e.g. the same under mlx.launch); ``popen``
    adds Popen arguments.
    """

    def __init__(self, packed: Path, tmp_path: Path, command: list[str] | None = None, **popen):
        env = {
            **os.environ,
            "STREAMER_HOME": str(tmp_path / "home"),
            "STREAMER_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            command or [*STREAMER, "serve", str(packed), "--port", "0", "--served-model-name", "tiny"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
            **popen,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.url is None and (m := re.search(r"Anthropic API at (http://\S+)", line)):
                self.url = m.group(1)
                self._listening.set()
        self._listening.set()  # stderr closed: the process ended without listening

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_healthy(self, timeout: float = 60) -> None:
        assert self._listening.wait(timeout), f"serve did not start in {timeout} s: {self.stderr}"
        assert self.url, f"serve exited ({self.proc.poll()}) before listening: {self.stderr}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    assert json.load(r)["status"] == "ok"
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise

    def ask(self) -> None:
        body = json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        ).encode()
        req = urllib.request.Request(
            self.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] >= 1

    def interrupt(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(timeout)  # stderr is read to its end
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_ctrl_c_exits_130_cleanly_every_time(packed, tmp_path):
    outcomes = []
    for n in range(STARTS):
        after_request = n % 2 == 1
        serve = Serve(packed, tmp_path / str(n))
        try:
            serve.wait_healthy()
            if after_request:
                serve.ask()
            code = serve.interrupt()
        finally:
            serve.kill()
        outcomes.append((n, after_request, code, serve.stderr))
    bad = [
        f"start {n} ({'after a request' if req else 'idle'}): exit {code}, stderr {err!r}"
        for n, req, code, err in outcomes
        if code != 130
        or "terminate called" in err
        or "Traceback" in err
        or err.strip().splitlines()[-1] != "interrupted"
    ]
    assert not bad, "\n".join(bad)
