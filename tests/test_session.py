"""Session files: exact round trips of the model state, the same next tokens after a load (also in a new
process), clear refusals for another model, dtype, version or a damaged file."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from streamer.generation.chat_session import ChatSession
from streamer.generation.sampling import SamplingParams
from streamer.loader import load_engine
from streamer.models.layer_cache import DeltaNetSnapshot, KVSnapshot
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.storage.session import (
    MAGIC,
    SessionError,
    SessionState,
    list_sessions,
    read_session,
    session_path,
    write_session,
)
from streamer.synthetic.writer import generate

GREEDY = SamplingParams(0.0)
STREAMER = [sys.executable, "-c", "from streamer.cli.main import main; main()"]


def _packed(root, seed):
    src = generate(root / f"src{seed}", "tiny", dtype="float32", seed=seed)
    run_repack(make_plan(src, root / f"packed{seed}"))
    return root / f"packed{seed}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _packed(tmp_path_factory.mktemp("session-model"), seed=0)


@pytest.fixture(scope="module")
def engine(model):
    with load_engine(model) as e:
        yield e


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _arrays(state: SessionState) -> list:
    out = []
    for snaps in (state.caches, state.boundary or []):
        for s in snaps:
            fields = ("keys", "values") if isinstance(s, KVSnapshot) else ("conv_state", "recurrent_state")
            out += [None if getattr(s, f) is None else _bits(getattr(s, f)) for f in fields]
    return out


def _bits(a: mx.array) -> np.ndarray:
    return np.array(mx.view(a, mx.uint16) if a.dtype == mx.bfloat16 else a)


def _turn(session, text):
    list(session.send(text))
    return session.turns[-1].token_ids


def test_state_round_trips_exactly(engine, tmp_path):
    session = ChatSession(engine, GREEDY, max_tokens=6, system="Be brief.")
    _turn(session, "hello 🙂")
    state = session.export_state()
    path = tmp_path / "a.session"
    size = write_session(path, state)
    assert path.stat().st_size == size and path.read_bytes()[:8] == MAGIC
    back = read_session(path)
    assert back.messages == state.messages and back.token_ids == state.token_ids
    assert (back.model, back.dtype, back.boundary_tokens) == (state.model, state.dtype, state.boundary_tokens)
    for a, b in zip(_arrays(state), _arrays(back), strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert not list(tmp_path.glob("*.partial"))


def test_bfloat16_state_keeps_every_bit(tmp_path):
    rng = np.random.default_rng(0)
    kv = mx.array(rng.standard_normal((1, 2, 5, 8)).astype(np.float32)).astype(mx.bfloat16)
    rec = mx.array(rng.standard_normal((1, 2, 4, 4)).astype(np.float32)).astype(mx.bfloat16)
    state = SessionState(
        model={"name": "m", "fingerprint": "f"},
        dtype="bfloat16",
        messages=[{"role": "user", "content": "x"}],
        token_ids=[1, 2, 3, 4, 5],
        caches=[KVSnapshot(kv, kv * 2, 5), DeltaNetSnapshot(None, rec, 5)],
        boundary_tokens=3,
        boundary=[KVSnapshot(kv[..., :3, :], (kv * 2)[..., :3, :], 3), DeltaNetSnapshot(None, rec * 3, 3)],
    )
    write_session(tmp_path / "b.session", state)
    back = read_session(tmp_path / "b.session")
    assert back.caches[0].keys.dtype == mx.bfloat16
    for a, b in zip(_arrays(state), _arrays(back), strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_loaded_session_gives_the_same_next_tokens_as_an_uninterrupted_one(engine, tmp_path):
    uninterrupted = ChatSession(engine, GREEDY, max_tokens=8)
    _turn(uninterrupted, "hello")
    write_session(tmp_path / "s.session", uninterrupted.export_state())
    expected = [_turn(uninterrupted, "go on"), _turn(uninterrupted, "and?")]

    resumed = ChatSession(engine, GREEDY, max_tokens=8)
    resumed.import_state(read_session(tmp_path / "s.session"))
    assert [_turn(resumed, "go on"), _turn(resumed, "and?")] == expected
    assert resumed.turns[0].reused == "snapshot"  # the boundary state came back from the file too


def test_a_session_saved_before_any_turn_loads_and_runs(engine, tmp_path):
    fresh = ChatSession(engine, GREEDY, max_tokens=4, system="Hi.")
    write_session(tmp_path / "f.session", fresh.export_state())
    resumed = ChatSession(engine, GREEDY, max_tokens=4)
    resumed.import_state(read_session(tmp_path / "f.session"))
    assert resumed.system == "Hi." and resumed.cached_ids == []
    assert _turn(resumed, "hello") == _turn(fresh, "hello")


def test_sessions_live_in_the_data_dir_under_safe_names(home):
    assert session_path("work-1.2_x") == home / "sessions" / "work-1.2_x.session"
    for bad in ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 101]:
        with pytest.raises(SessionError, match="bad session name"):
            session_path(bad)
    assert list_sessions() == []
    with pytest.raises(SessionError, match="no such session"):
        read_session(session_path("missing"))


def test_refuses_another_model_and_another_dtype(engine, tmp_path):
    session = ChatSession(engine, GREEDY, max_tokens=3)
    _turn(session, "hello")
    state = session.export_state()
    with load_engine(_packed(tmp_path, seed=1)) as other:
        with pytest.raises(SessionError, match=r"saved with model 'packed0'.*streamer chat .*packed0`"):
            ChatSession(other, GREEDY).import_state(state, source="session s")
    with pytest.raises(SessionError, match="--dtype bfloat16"):
        ChatSession(engine, GREEDY).import_state(dataclasses.replace(state, dtype="bfloat16"))


def test_damaged_files_fail_with_the_reason_and_the_path(engine, tmp_path):
    session = ChatSession(engine, GREEDY, max_tokens=3)
    _turn(session, "hello")
    good = tmp_path / "good.session"
    write_session(good, session.export_state())
    data = good.read_bytes()
    (_, _, head_len) = struct.unpack_from("<8sII", data)

    def damaged(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SessionError) as e:
            read_session(path)
        assert str(path) in str(e.value)
        return str(e.value)

    assert "not a streamer session" in damaged("magic", b"NOTASESS" + data[8:])
    assert "not a streamer session" in damaged("short", data[:5])
    assert "version 9" in damaged("version", data[:8] + struct.pack("<I", 9) + data[12:])
    assert "truncated" in damaged("truncated", data[:-10])
    flipped = bytearray(data)
    flipped[16 + head_len + 40] ^= 0xFF
    assert any(w in damaged("flipped", bytes(flipped)) for w in ("CRC-32", "decompress", "bytes"))
    assert "corrupt session header" in damaged("header", data[:16] + b"[" + data[17:])


def test_save_and_load_across_a_process_restart(model, tmp_path):
    env = {**os.environ, "STREAMER_HOME": str(tmp_path / "home"), "STREAMER_CACHE": str(tmp_path / "c")}

    def chat(stdin: bytes):
        r = subprocess.run(
            [*STREAMER, "chat", str(model), "--temp", "0", "-n", "8"],
            input=stdin,
            capture_output=True,
            env=env,
        )
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()
        return r.stdout.decode(), r.stderr.decode()

    whole, _ = chat(b"hello\ngo on\n")
    first, err = chat(b"hello\n/save talk\n")
    assert "saved session talk" in err and (tmp_path / "home/sessions/talk.session").is_file()
    second, err = chat(b"/load talk\ngo on\n")
    assert "loaded session talk: 1 messages from you" in err
    assert first + second == whole
    _, err = chat(b"/load nothere\n/save ../x\n/load\n")
    assert "no such session (saved sessions: talk)" in err
    assert "bad session name" in err and "saved sessions: talk" in err
