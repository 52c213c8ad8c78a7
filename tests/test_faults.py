"""A flaky disk under a running model: expert reads that fail (EIO), come up short, are slow or never return.

Faults are injected through the store's ``fault(layer, expert)`` hook, only while decoding (the runtime's
routing hook says whether a step is one token). Each fault must fail its own request with one clear line
naming the file, layer and expert, within the I/O timeout; the runtime must stay consistent, so the next
request works and gives the same tokens as a model that never saw a fault; `serve` stays up throughout.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import threading
import time

import pytest
from click.testing import CliRunner

from streamer.cli import options as cli_options
from streamer.cli.main import main
from streamer.experts.store import ExpertReadError
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.settings import RuntimeConfig
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

TIMEOUT_S = 0.5  # --io-timeout in these tests
CACHE = ["--cache-experts", "6"]  # 6 slots for 4 layers x 16 experts: decode keeps reading


class Fault:
    """A disk that misbehaves once: the ``after``-th expert read of a decode step after ``arm``."""

    def __init__(self):
        self.kind: str | None = None
        self.after = 0
        self.decoding = False
        self.fired: list[tuple[int, int]] = []
        self.release = threading.Event()  # ends a "hang"
        self.stalled = 0  # "slow" or "hang" reads still running
        self._lock = threading.Lock()

    def arm(self, kind: str, after: int = 3) -> Fault:
        self.kind, self.after = kind, after
        self.release.clear()
        return self

    def route(self, layer: int, ids) -> None:
        self.decoding = ids.shape[0] == 1  # one token per step: decode, not prefill

    def install(self, engine) -> None:
        engine.runtime.store.fault = self
        engine.runtime.on_route = self.route

    def __call__(self, layer: int, expert: int) -> None:
        with self._lock:
            if self.kind is None or not self.decoding:
                return
            if self.after > 0:
                self.after -= 1
                return
            kind, self.kind = self.kind, None
            self.fired.append((layer, expert))
        if kind == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        with self._lock:
            self.stalled += 1
        try:
            if kind == "slow":
                time.sleep(4 * TIMEOUT_S)
            if kind == "hang":
                self.release.wait(30)
        finally:
            with self._lock:
                self.stalled -= 1

    def wait_until_reads_end(self, timeout: float = 30) -> None:
        """Polls (bounded) until no stalled read is still running."""
        deadline = time.monotonic() + timeout
        while self.stalled:
            assert time.monotonic() < deadline, "a stalled read never ended"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


def _tokens(engine, n: int = 12) -> list[int]:
    sampler = make_sampler(SamplingParams())
    return [r.token for r in stream_generate(engine.model, engine.tokenizer, [7, 8, 9], sampler, n)]


@pytest.fixture(scope="module")
def clean_tokens(packed) -> list[int]:
    with load_engine(packed, RuntimeConfig(cache_experts=6)) as engine:
        return _tokens(engine)


# ----------------------------------------------------------------------------------------------------
# The runtime: every prefetch mode recovers, and a late read never lands in a reused slot.


@pytest.mark.parametrize("prefetch", ["off", "parallel", "predict"])
def test_runtime_recovers_from_eio_and_a_read_that_never_returns(packed, clean_tokens, prefetch):
    config = RuntimeConfig(cache_experts=6, prefetch=prefetch, io_timeout_s=TIMEOUT_S)
    with load_engine(packed, config) as engine:
        fault = Fault()
        fault.install(engine)
        fault.arm("eio")
        with pytest.raises(
            ExpertReadError, match=r"layer_00\d.bin: reading layer \d expert \d+ failed: Input/out"
        ):
            _tokens(engine, 40)
        assert engine.runtime.cache.pinned_count() == 0
        assert _tokens(engine) == clean_tokens

        fault.arm("hang")
        with pytest.raises(ExpertReadError, match=r"took longer than 0.5 s \(--io-timeout\)"):
            _tokens(engine, 40)
        assert fault.stalled == 1  # the step gave up while the read still hung: it did not wait for it
        (layer, expert), runtime = fault.fired[-1], engine.runtime
        # The stuck read still owns its slot: nothing else may be read into it until the read ends.
        assert runtime.cache.pinned_count() == 1 and (layer, expert) not in runtime.cache
        for _ in range(3):  # the stuck expert may be needed again: a clear error, not a merged read
            try:
                assert _tokens(engine) == clean_tokens
            except ExpertReadError as e:
                assert "has not returned" in str(e) and f"layer {layer} expert {expert}" in str(e)
        fault.release.set()
        fault.wait_until_reads_end()
        assert _tokens(engine) == clean_tokens
        assert runtime.cache.pinned_count() == 0 and not runtime._orphans


# ----------------------------------------------------------------------------------------------------
# generate and chat: one line, then the process ends (or the chat goes on).


@pytest.fixture
def faulty_cli(monkeypatch):
    """Makes the CLI's engines use a Fault (and optionally damage the files once they are open)."""
    fault, after_open = Fault(), []

    def load(*args, **kwargs):
        engine = load_engine(*args, **kwargs)
        fault.install(engine)
        for damage in after_open:
            damage(engine)
        return engine

    monkeypatch.setattr(cli_options, "load_engine", load)
    return fault, after_open


def _truncate_layer_3(engine) -> None:
    entry = engine.runtime.packed.manifest.layers[3]
    os.truncate(engine.path / entry.file, entry.block_offset(1) + 100)  # expert 0 whole, the rest gone


@pytest.mark.parametrize(
    ("kind", "flags", "message"),
    [
        ("eio", [], r"reading layer \d expert \d+ failed: Input/output error"),
        (
            "short",
            [],
            r"layer_003.bin: reading layer 3 expert \d+ failed: short read \(\d+ of \d+ bytes; file trunc",
        ),
        (
            "slow",
            [],
            r"reading layer \d expert \d+ took longer than 0.5 s \(--io-timeout\); is the disk still",
        ),
        ("slow", ["--prefetch", "off"], r"took longer than 0.5 s"),
    ],
    ids=["eio", "short-read", "slow", "slow-prefetch-off"],
)
def test_generate_fails_with_one_line(packed, tmp_path, faulty_cli, kind, flags, message):
    fault, after_open = faulty_cli
    if kind == "short":
        work = tmp_path / "packed"
        work.mkdir()
        for p in packed.rglob("*"):  # a copy whose layer file shrinks under the running model
            dst = work / p.relative_to(packed)
            dst.mkdir(exist_ok=True) if p.is_dir() else dst.write_bytes(p.read_bytes())
        after_open.append(_truncate_layer_3)
        model = work
    else:
        fault.arm(kind)
        model = packed
    args = ["generate", str(model), "--prompt-ids", "7,8,9", "-n", "60", *CACHE, "--io-timeout", "0.5"]
    result = CliRunner().invoke(main, [*args, *flags])
    if kind in ("slow", "hang"):
        assert fault.stalled == 1  # the command ended while its read still stalled: bounded by --io-timeout
        fault.release.set()
        fault.wait_until_reads_end()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    last = result.output.splitlines()[-1]
    assert last.startswith(f"Error: {model}/experts/layer_00") and "Traceback" not in result.output
    assert re.search(message, last), last


def test_chat_reports_the_fault_and_answers_the_next_message(packed, faulty_cli):
    fault, _ = faulty_cli
    fault.arm("eio")
    result = CliRunner().invoke(
        main, ["chat", str(packed), "-n", "40", "--temp", "0", *CACHE], input=b"first\nsecond\n"
    )
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    lines = result.output.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "expert" in errors[0] and "Input/output error" in errors[0]
    stats = [line for line in lines if line.startswith("[") and "tok/s" in line]
    assert len(stats) == 2 and "interrupted" in stats[0] and "interrupted" not in stats[1]


# ----------------------------------------------------------------------------------------------------
# serve: the request fails in its API's format, the server answers the next one.


@pytest.fixture(scope="module")
def server(packed):
    fault = Fault()

    def load():
        engine = load_engine(packed, RuntimeConfig(cache_experts=6, io_timeout_s=TIMEOUT_S))
        fault.install(engine)
        return engine

    s = start_server(
        load, ServeConfig(port=0, model_names=("tiny",), prefix_cache_bytes=0)
    ).start_background()
    s.fault = fault
    yield s
    fault.release.set()
    s.close()


def _post(s, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)  # a hang fails the test
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


COMPLETION = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 40,
    "ignore_eos": True,
}


def _text(completion: bytes) -> str:
    return json.loads(completion)["choices"][0]["text"]


def _healthy(s) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_serve_read_error_fails_one_request(server, packed):
    status, clean = _post(server, "/v1/completions", COMPLETION)
    assert status == 200
    server.fault.arm("eio")
    status, data = _post(server, "/v1/completions", COMPLETION)
    error = json.loads(data)["error"]
    assert status == 500 and error["type"] == "server_error"
    assert f"{packed}/experts/layer_00" in error["message"] and "Input/output error" in error["message"]
    assert "Traceback" not in error["message"]
    status, again = _post(server, "/v1/completions", COMPLETION)
    assert status == 200 and _text(again) == _text(clean)
    server.fault.arm("eio")
    status, data = _post(server, "/v1/messages", {**CHAT, "stream": True})
    text = data.decode()
    assert status == 200 and "event: error" in text and "Input/output error" in text
    server.fault.arm("eio")
    status, data = _post(server, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and '"error"' in data.decode() and "Input/output error" in data.decode()
    assert _post(server, "/v1/chat/completions", CHAT)[0] == 200
    stats = json.loads(http_get(server, "/v1/stats"))
    assert stats["totals"]["failed"] == 3 and stats["recent"][-2]["finish_reason"] == "error"


def http_get(s, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


@pytest.mark.parametrize("kind", ["slow", "hang"])
def test_serve_stalled_read_times_out_and_the_server_goes_on(server, kind):
    status, clean = _post(server, "/v1/completions", COMPLETION)
    assert status == 200
    server.fault.arm(kind)
    status, data = _post(server, "/v1/completions", COMPLETION)
    assert status == 500 and "took longer than 0.5 s (--io-timeout)" in json.loads(data)["error"]["message"]
    assert server.fault.stalled == 1  # answered while the read still stalled: bounded by --io-timeout
    _healthy(server)
    if kind == "hang":  # while the read is stuck, requests that need that expert fail, others work
        for _ in range(2):
            status, data = _post(server, "/v1/completions", COMPLETION)
            assert status == 200 or "has not returned" in json.loads(data)["error"]["message"]
        server.fault.release.set()
    server.fault.wait_until_reads_end()
    status, data = _post(server, "/v1/completions", COMPLETION)
    assert status == 200 and _text(data) == _text(clean)
