"""`streamer serve` through the official openai and anthropic clients on a tiny synthetic model: the
OpenAI API on the real model, bad requests in each API's error format, concurrency and disconnects.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

import anthropic
import openai
import pytest

from streamer.errors import ConfigError
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from tests.serve.helpers import GREEDY, anth, oai, raw, setting, stats

# ---------------------------------------------------------------------------------------------------------
# OpenAI API on the real model


def test_health_and_models(server):
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "model": "tiny"})
    assert [m.id for m in oai(server).models.list()] == ["tiny", "packed"]
    assert oai(server).models.retrieve("tiny").id == "tiny"


def test_chat_completion(server):
    r = oai(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,  # deterministic: sampled noise closes </think> now and then
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == r.usage.total_tokens - 6 > 0
    # Thinking is on by default: a random model never closes <think>, so it is all reasoning.
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] and not message.content


def test_chat_stream_with_usage(server):
    chunks = list(
        oai(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Stream please"}],
            max_completion_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1
    # Without include_usage there is no usage chunk.
    plain = list(
        oai(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True
        )
    )
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_completions(server):
    client = oai(server)
    r = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=4, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert r.object == "text_completion" and r.usage.completion_tokens == 4
    streamed = list(
        client.completions.create(
            model="tiny",
            prompt="The quick brown",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == 4
    # The same prompt again restores the snapshot taken before its last token.
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1)
    assert ids.usage.prompt_tokens == 3


def test_seeded_sampling_repeats(server):
    def ask():
        return oai(server).completions.create(
            model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
            extra_body={"top_k": 50, "ignore_eos": True, "presence_penalty": 0.5},
        ).choices[0].text  # fmt: skip

    assert ask() == ask()


# ---------------------------------------------------------------------------------------------------------
# Bad requests: each API's error JSON, never a 500


def test_bad_requests_openai(server):
    client = oai(server)
    user = [{"role": "user", "content": "hi"}]
    status, body = raw(
        server, "POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}
    )
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert raw(server, "POST", "/v1/chat/completions", b"[1, 2]")[0] == 400
    assert raw(server, "POST", "/v1/chat/completions", b"{}", {"Content-Length": "-5"})[0] == 400
    for bad in [
        {"messages": "hi"},
        {"messages": user, "temperature": "hot"},
        {"messages": user, "max_tokens": 0},
        {"messages": user, "max_tokens": True},
        {"messages": user, "max_tokens": 10**400},
        {"messages": user, "seed": -2},  # -1 means a random seed
        {"messages": user, "top_p": 1.5},
        {"messages": user, "stop": [1]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {
            "messages": [
                {"role": "assistant", "content": "no user turn"},
                {"role": "assistant", "content": "x"},
            ]
        },
        {"messages": user, "chat_template_kwargs": {"enable_thinking": "no"}},
        {"messages": user, "tools": [{"type": "function"}]},
    ]:
        status, body = raw(
            server, "POST", "/v1/chat/completions", json.dumps({"model": "tiny", **bad}).encode()
        )
        assert (
            status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
        ), bad
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-9", messages=user)
    with (
        pytest.raises(openai.BadRequestError, match="maximum context length is 64"),
        setting(server, context_length=64),
    ):
        client.chat.completions.create(model="tiny", messages=user, max_tokens=60)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt=[10**9])
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    assert raw(server, "DELETE", "/v1/models")[0] == 405


def test_bad_requests_anthropic(server):
    client = anth(server)
    with pytest.raises(anthropic.BadRequestError, match="role"):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "tool", "content": "x"}])
    user = [{"role": "user", "content": "hi"}]
    status, body = raw(server, "POST", "/v1/messages", b"{oops")
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    for bad in [
        {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
        {"max_tokens": "10", "messages": user},
        {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"max_tokens": 10, "messages": user, "thinking": {"type": "sometimes"}},
        {"max_tokens": 10, "messages": user, "system": 5},
    ]:
        status, body = raw(server, "POST", "/v1/messages", json.dumps({"model": "tiny", **bad}).encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error", bad
    status, body = raw(
        server, "POST", "/v1/messages", json.dumps({"model": "tiny", "messages": user}).encode()
    )
    assert status == 400 and "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=5, messages=user)
    with setting(server, accept_any_model=True):
        assert client.messages.create(model="claude-x", max_tokens=1, messages=user).model == "claude-x"
    with pytest.raises(anthropic.BadRequestError, match="context limit"), setting(server, context_length=32):
        client.messages.create(model="tiny", max_tokens=50, messages=user)
    assert client.messages.count_tokens(model="tiny", messages=user).input_tokens > 0


def test_api_key(server):
    user = [{"role": "user", "content": "hi"}]
    with setting(server, api_key="sekret"):
        with pytest.raises(openai.AuthenticationError):
            oai(server, api_key="wrong").chat.completions.create(model="tiny", messages=user, max_tokens=1)
        with pytest.raises(anthropic.AuthenticationError):
            anth(server, api_key="wrong").messages.create(model="tiny", messages=user, max_tokens=1)
        status, body = raw(server, "GET", "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert oai(server, api_key="sekret").chat.completions.create(
            model="tiny", messages=user, max_tokens=1
        )
        assert anth(server, api_key="sekret").messages.create(model="tiny", messages=user, max_tokens=1)
        assert raw(server, "GET", "/health")[0] == 200


# ---------------------------------------------------------------------------------------------------------
# Concurrency and disconnects


WORDS = "fox river stone apple cloud seven quantum purple engine basket violin tiger ocean".split()


def test_twenty_concurrent_clients(server):
    """Twenty clients at once, half per API, decoded in batches: all answered, each exactly as it is
    answered alone."""
    before = stats(server)["totals"]["requests"]
    answers, errors = {}, []

    def ask(i: int) -> tuple[str, int]:
        # Prompts of different lengths and words: a random model answers them differently.
        messages = [
            {"role": "user", "content": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i + 1))}
        ]
        if i % 2:
            no_think = {**GREEDY, "chat_template_kwargs": {"enable_thinking": False}}
            r = oai(server).chat.completions.create(
                model="tiny", messages=messages, max_tokens=5, extra_body=no_think
            )
            return r.choices[0].message.content, r.usage.completion_tokens
        no_think = {**GREEDY, "thinking": {"type": "disabled"}}
        m = anth(server).messages.create(model="tiny", max_tokens=5, messages=messages, extra_body=no_think)
        return "".join(b.text for b in m.content if b.type == "text"), m.usage.output_tokens

    def ask_concurrently(i: int) -> None:
        try:
            answers[i] = ask(i)
        except Exception as e:  # collected: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=ask_concurrently, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(answers) == list(range(20)) and all(1 <= n <= 5 for _, n in answers.values()), answers
    # A request's record is written just after its answer is sent: wait (bounded) for the last ones.
    _poll(lambda: stats(server)["totals"]["requests"] - before >= 20, "all 20 requests to be recorded")
    assert stats(server)["totals"]["requests"] - before == 20
    assert stats(server)["batch"]["largest_batch"] >= 2  # they really were decoded together
    alone = {i: ask(i) for i in range(20)}
    assert answers == alone
    # The tiny random model answers most prompts alike; three distinct answers make a mix-up visible.
    assert len({text for text, _ in alone.values()}) >= 3


def _wait_for(s, label: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in stats(s)["recent"]:
            if record["label"] == label:
                return record
        time.sleep(0.05)
    raise AssertionError(f"{label} never finished")


def test_disconnect_mid_stream_stops_generation(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50000}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True, "ignore_eos": True}))
    resp = conn.getresponse()
    first = resp.fp.readline()  # the chunk-size line, then the first event
    line = resp.fp.readline()
    assert first and line.startswith(b"data: ")
    label = json.loads(line[6:])["id"]
    for _ in range(20):
        resp.fp.readline()
    conn.sock.shutdown(2)
    conn.close()
    record = _wait_for(server, label)
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 50000
    # A non-streaming client that gives up is noticed too (the server polls its socket).
    before = stats(server)["totals"]["requests"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "zz", "max_tokens": 50000, "ignore_eos": True}),
    )
    _poll(lambda: stats(server)["busy"], "the request to start generating")
    conn.sock.shutdown(2)
    conn.close()
    _poll(lambda: stats(server)["totals"]["requests"] > before, "the abandoned request to end")
    record = stats(server)["recent"][-1]  # this request's own record: the only one since `before`
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 50000


def _poll(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_port_in_use_is_a_clear_error(server, packed):
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(lambda: load_engine(packed), ServeConfig(port=server.port))


def test_cli_serve_subprocess(packed, tmp_path):
    env = {**os.environ, "STREAMER_HOME": str(tmp_path / "home"), "STREAMER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "streamer"),
            "serve",
            str(packed),
            "--port",
            "0",
            "--api-key",
            "k",
            "--no-think",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stderr.readline()
        url = re.search(r"OpenAI API at (\S+),", line).group(1)
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["packed"]
        r = client.chat.completions.create(
            model="packed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(10)
