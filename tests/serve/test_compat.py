"""What the clients people use send to `streamer serve` (litellm, LangChain, pydantic-ai, browser UIs, the
official SDKs): system messages anywhere, tool_choice and response_format values, logprobs, long prompts,
CORS, HEAD and HTTP/1.0, through the official clients or raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket

import anthropic
import mlx.core as mx
import openai
import pytest

from streamer.generation.generate import prefill
from streamer.loader import load_engine
from tests.serve.helpers import CALL, GREEDY, WEATHER_TOOL, anth, oai, raw, setting

OFF = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "hi"}]


def _post(s, path: str, body: dict) -> tuple[int, dict]:
    return raw(s, "POST", path, json.dumps({"model": "tiny", **body}).encode())


# ---------------------------------------------------------------------------------------------------------
# System messages


def test_system_and_developer_messages_anywhere_are_merged_in_order(scripted):
    scripted.script.pieces = ["ok"]
    r = oai(scripted).chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Answer in French."},
            {"role": "assistant", "content": "salut"},
            {"role": "system", "content": [{"type": "text", "text": "Retry: use JSON."}]},
            {"role": "user", "content": "again"},
        ],
        extra_body=OFF,
    )
    assert r.choices[0].message.content == "ok"
    prompt = scripted.script.prompts[-1]
    assert prompt.startswith(
        "<|im_start|>system\nBe brief.\n\nAnswer in French.\n\nRetry: use JSON.<|im_end|>"
    )
    assert prompt.count("<|im_start|>system") == 1 and prompt.index("salut") < prompt.index("again")

    # Anthropic: the top-level system first, then system-role messages some clients send.
    scripted.script.pieces = ["fine"]
    m = anth(scripted).messages.create(
        model="tiny",
        max_tokens=5,
        system=[{"type": "text", "text": "Top."}],
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "Later."},
            {"role": "user", "content": "more"},
        ],
        thinking={"type": "disabled"},
    )
    assert m.content[0].text == "fine"
    prompt = scripted.script.prompts[-1]
    assert prompt.startswith("<|im_start|>system\nTop.\n\nLater.<|im_end|>") and prompt.count("system") == 1


# ---------------------------------------------------------------------------------------------------------
# tool_choice, response_format, n


def test_openai_tool_choice_values(scripted):
    scripted.script.pieces = [CALL]
    client = oai(scripted)
    for choice in ("auto", None):
        r = client.chat.completions.create(
            model="tiny", messages=USER, tools=[WEATHER_TOOL], extra_body=OFF,
            **({"tool_choice": choice} if choice else {}),
        )  # fmt: skip
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    scripted.script.pieces = ["plain"]
    client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice="none", extra_body=OFF
    )
    assert "get_weather" not in scripted.script.prompts[-1]  # "none": the tools are not shown
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):  # enforced by constrained decoding (tests/serve/test_constrained.py)
        status, body = _post(
            scripted,
            "/v1/chat/completions",
            {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": choice},
        )
        assert status == 200, (choice, body)
    for choice, words in [
        ({"type": "function", "function": {"name": "nope"}}, "not among the tools ('get_weather')"),
        ("sometimes", "tool_choice must be"),
        ({"type": "function"}, "tool_choice must be"),
        ({"type": "allowed_tools"}, "tool_choice must be"),
        (5, "tool_choice must be a string or an object"),
    ]:
        status, body = _post(
            scripted,
            "/v1/chat/completions",
            {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": choice},
        )
        assert status == 400 and words in body["error"]["message"], (choice, body)
        assert body["error"]["param"] == "tool_choice" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="tool_choice must be"):
        client.chat.completions.create(
            model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice="sometimes"
        )


def test_anthropic_tool_choice_values(scripted):
    tool = {"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}
    scripted.script.pieces = ["plain"]
    client = anth(scripted)
    for choice in ({"type": "auto"}, {"type": "auto", "disable_parallel_tool_use": True}, {"type": "none"}):
        m = client.messages.create(
            model="tiny",
            max_tokens=5,
            messages=USER,
            tools=[tool],
            tool_choice=choice,
            thinking={"type": "disabled"},
        )
        assert m.content[-1].text == "plain"
        assert ("get_weather" in scripted.script.prompts[-1]) == (choice["type"] == "auto")
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):  # enforced (test_constrained)
        status, body = _post(
            scripted,
            "/v1/messages",
            {"max_tokens": 5, "messages": USER, "tools": [tool], "tool_choice": choice},
        )
        assert status == 200, (choice, body)
    for choice, words in [
        ({"type": "tool", "name": "other"}, "needs the name of one of the tools ('get_weather')"),
        ({"type": "tool"}, "needs the name"),
        ({"type": "whatever"}, "tool_choice.type must be"),
        ({}, "tool_choice.type is required"),
        ("auto", "tool_choice must be an object"),
    ]:
        status, body = _post(
            scripted,
            "/v1/messages",
            {"max_tokens": 5, "messages": USER, "tools": [tool], "tool_choice": choice},
        )
        assert status == 400 and words in body["error"]["message"], (choice, body)
        assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="tool_choice.type must be"):
        client.messages.create(
            model="tiny", max_tokens=5, messages=USER, tools=[tool], tool_choice={"type": "whatever"}
        )
    # Counting tokens runs nothing: a forced choice is fine there (an invalid one is not).
    count = client.messages.count_tokens(
        model="tiny", messages=USER, tools=[tool], tool_choice={"type": "any"}
    )
    assert count.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError, match="tool_choice.type must be"):
        client.messages.count_tokens(model="tiny", messages=USER, tools=[tool], tool_choice={"type": "x"})


def test_response_format(scripted):
    scripted.script.pieces = ["text"]
    r = oai(scripted).chat.completions.create(
        model="tiny", messages=USER, response_format={"type": "text"}, extra_body=OFF
    )
    assert r.choices[0].message.content == "text"
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }
    for fmt in ({"type": "json_object"}, schema):  # enforced (tests/serve/test_constrained.py)
        status, body = _post(
            scripted, "/v1/chat/completions", {"messages": USER, "response_format": fmt, **OFF}
        )
        assert status == 200, (fmt, body)
    for fmt, words in [
        ({"type": "yaml"}, "response_format.type must be"),
        ({}, None),
        ("json", "response_format must be an object"),
    ]:
        status, body = _post(
            scripted, "/v1/chat/completions", {"messages": USER, "response_format": fmt, **OFF}
        )
        if words is None:
            assert status == 200, body
            continue
        assert status == 400 and words in body["error"]["message"], (fmt, body)
        assert body["error"]["param"] == "response_format"


def test_n_above_the_batch_says_why(scripted):
    cap = scripted.worker.batch.max_batch
    for path, body in [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})]:
        status, err = _post(scripted, path, {**body, "n": cap + 1})
        assert status == 400 and err["error"]["param"] == "n", err
        message = err["error"]["message"]
        assert f"n must be at most {cap}, got {cap + 1}" in message and "--max-batch" in message
        assert _post(scripted, path, {**body, "n": 0})[1]["error"]["param"] == "n"
    scripted.script.pieces = ["ok"]
    status, body = _post(scripted, "/v1/completions", {"prompt": "x", "n": cap})
    assert status == 200 and [c["index"] for c in body["choices"]] == list(range(cap)), body


def test_ignore_eos_with_a_constraint_is_refused_naming_both(scripted):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    json_object = {"type": "json_object"}
    for path, body, param in [
        ("/v1/chat/completions", {"messages": USER, "response_format": json_object}, "response_format"),
        ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": forced},
         "tool_choice"),
        ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_object"}}}, "text.format"),
        (
            "/v1/messages",
            {"messages": USER, "max_tokens": 3, "tool_choice": {"type": "any"},
             "tools": [{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}]},
            "tool_choice",
        ),
    ]:  # fmt: skip
        status, err = _post(scripted, path, {**body, "ignore_eos": True})
        message = err["error"]["message"]
        assert status == 400 and "ignore_eos" in message and param in message, (path, err)
        if path != "/v1/messages":
            assert err["error"]["param"] == "ignore_eos"


def test_reasoning_tokens_count_what_came_before_think_close(scripted):
    scripted.script.pieces = ["Let ", "me ", "see.", "</think>", "\n\n", "Hi."]
    r = oai(scripted).chat.completions.create(model="tiny", messages=USER)
    assert r.usage.completion_tokens == 6 and r.usage.completion_tokens_details.reasoning_tokens == 3
    r = oai(scripted).chat.completions.create(model="tiny", messages=USER, extra_body=OFF)
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    with oai(scripted).chat.completions.create(
        model="tiny", messages=USER, stream=True, stream_options={"include_usage": True}
    ) as stream:
        usage = [c.usage for c in stream if c.usage][0]
    assert usage.completion_tokens_details.reasoning_tokens == 3


def test_reasoning_tokens_of_the_model_end_at_its_think_close_token(server):
    # The tiny random model rarely writes </think>: then every token is reasoning.
    r = oai(server).chat.completions.create(
        model="tiny", messages=USER, max_tokens=8, logprobs=True,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": True}}, **GREEDY,
    )  # fmt: skip
    tokens = [t.token for t in r.choices[0].logprobs.content]
    before_close = tokens.index("</think>") if "</think>" in tokens else len(tokens)
    assert r.usage.completion_tokens_details.reasoning_tokens == before_close
    r = oai(server).chat.completions.create(
        model="tiny", messages=USER, max_tokens=8, extra_body={"ignore_eos": True, **OFF}, **GREEDY
    )
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


# ---------------------------------------------------------------------------------------------------------
# Sampling fields and long prompts


def test_seed_minus_one_is_random_and_top_p_zero_names_its_param(scripted):
    scripted.script.pieces = ["ok"]
    status, body = _post(scripted, "/v1/chat/completions", {"messages": USER, "seed": -1, "temperature": 1})
    assert status == 200, body
    assert scripted.httpd.app.settings.sampling(False, {"seed": None}).seed is None
    status, body = _post(scripted, "/v1/messages", {"messages": USER, "max_tokens": 3, "seed": -1})
    assert status == 200, body
    for seed in (-2, 2**64):
        assert (
            _post(scripted, "/v1/completions", {"prompt": "x", "seed": seed})[1]["error"]["param"] == "seed"
        )
    for path, body in [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/messages", {"messages": USER, "max_tokens": 3}),
    ]:
        status, err = _post(scripted, path, {**body, "top_p": 0})
        assert status == 400 and "top_p" in err["error"]["message"], (path, err)
        if "error" in err and "param" in err["error"]:
            assert err["error"]["param"] == "top_p"


def test_seed_minus_one_samples_afresh(server):
    def ask(seed):
        return oai(server).completions.create(
            model="tiny", prompt="Hello", max_tokens=12, temperature=1.5, seed=seed,
            extra_body={"ignore_eos": True},
        ).choices[0].text  # fmt: skip

    assert len({ask(-1) for _ in range(3)}) > 1  # a fixed seed would repeat itself


def test_prompt_too_long_in_each_api_s_words(scripted):
    long = [{"role": "user", "content": "word " * 100}]
    with setting(scripted, context_length=64):
        status, body = _post(scripted, "/v1/chat/completions", {"messages": long})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"
        assert "maximum context length is 64 tokens" in body["error"]["message"]
        status, body = _post(scripted, "/v1/chat/completions", {"messages": USER, "max_tokens": 60})
        assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
        status, body = _post(scripted, "/v1/completions", {"prompt": "word " * 100})
        assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as e:
            oai(scripted).chat.completions.create(model="tiny", messages=long)
        assert e.value.code == "context_length_exceeded"

        with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 63 maximum"):
            anth(scripted).messages.create(model="tiny", max_tokens=5, messages=long)
        with pytest.raises(anthropic.BadRequestError, match=r"exceed context limit: \d+ \+ 60 > 64"):
            anth(scripted).messages.create(model="tiny", max_tokens=60, messages=USER)


# ---------------------------------------------------------------------------------------------------------
# HTTP: CORS, HEAD, HTTP/1.0


def _exchange(s, request: bytes) -> tuple[bytes, bytes]:
    """Sends raw bytes, reads until the server closes: (head, body)."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _headers(s, method: str, path: str, headers: dict, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def test_cors_only_with_the_flag(scripted):
    ui = {"Origin": "http://ui.example"}
    preflight = {
        **ui,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    status, headers, _ = _headers(scripted, "GET", "/v1/models", ui)
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, data = _headers(scripted, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 405 and "access-control-allow-origin" not in headers and json.loads(data)["error"]

    app = scripted.httpd.app
    app.cors_origins = ("http://ui.example",)
    scripted.script.pieces = ["hi"]
    try:
        status, headers, data = _headers(scripted, "OPTIONS", "/v1/chat/completions", preflight)
        assert status == 204 and data == b""
        assert headers["access-control-allow-origin"] == "http://ui.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        # Without the browser's list, the default one names what the official SDKs send.
        status, headers, _ = _headers(
            scripted, "OPTIONS", "/v1/messages", {**ui, "Access-Control-Request-Method": "POST"}
        )
        allowed = headers["access-control-allow-headers"].lower()
        assert status == 204 and all(h in allowed for h in ("x-api-key", "anthropic-version", "content-type"))
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", json.dumps({"messages": USER, "stream": True, **OFF}).encode()),
            ("POST", "/v1/messages", b"{bad json"),  # errors too, or the browser hides them
        ]:
            status, headers, _ = _headers(scripted, method, path, ui, body)
            assert headers["access-control-allow-origin"] == "http://ui.example", (method, path, status)
            assert headers["vary"] == "Origin"
        with setting(scripted, api_key="k"):  # a preflight carries no key: it must still pass
            assert _headers(scripted, "OPTIONS", "/v1/chat/completions", preflight)[0] == 204
            status, headers, _ = _headers(scripted, "GET", "/v1/models", ui)
            assert status == 401 and headers["access-control-allow-origin"] == "http://ui.example"
        other = {"Origin": "http://evil.example"}
        assert "access-control-allow-origin" not in _headers(scripted, "GET", "/v1/models", other)[1]
        assert _headers(scripted, "OPTIONS", "/v1/models", {**preflight, **other})[0] == 405
        app.cors_origins = ("*",)
        assert _headers(scripted, "GET", "/health", other)[1]["access-control-allow-origin"] == "*"
    finally:
        app.cors_origins = ()


def test_head_answers_like_get_without_a_body(scripted):
    for path in ("/health", "/v1/models", "/v1/models/tiny", "/v1/stats"):
        get_status, get_headers, get_body = _headers(scripted, "GET", path, {})
        head, body = _exchange(
            scripted, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert head.startswith(b"HTTP/1.1 200") and body == b"", (path, head, body)
        assert b"Content-Type: application/json" in head
        if path != "/v1/stats":  # its counters move
            assert f"Content-Length: {len(get_body)}".encode() in head
    head, body = _exchange(
        scripted, b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 405") and body == b""
    # Keep-alive after a HEAD: the next answer on the connection is intact.
    conn = http.client.HTTPConnection("127.0.0.1", scripted.port, timeout=30)
    conn.request("HEAD", "/v1/models")
    assert conn.getresponse().read() == b""
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.close()


def test_http10_clients_get_no_chunked_encoding(scripted):
    scripted.script.pieces = ["Hello", " there"]
    body = json.dumps({"model": "tiny", "messages": USER, "stream": True, **OFF}).encode()
    request = b"POST /v1/chat/completions HTTP/%s\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
    head, data = _exchange(scripted, request % (b"1.0", len(body), b"", body))
    assert b"200" in head.split(b"\r\n")[0] and b"chunked" not in head.lower(), head
    assert data.startswith(b"data: {") and data.endswith(b"data: [DONE]\n\n"), data
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in data.decode().split("\n")
        if line.startswith("data: {")
    )
    assert text == "Hello there"
    # HTTP/1.1 still gets chunks (and a JSON answer to 1.0 has a Content-Length, as before).
    head, data = _exchange(scripted, request % (b"1.1", len(body), b"Connection: close\r\n", body))
    assert b"transfer-encoding: chunked" in head.lower()
    status_body = json.dumps({"model": "tiny", "messages": USER, **OFF}).encode()
    head, data = _exchange(scripted, request % (b"1.0", len(status_body), b"", status_body))
    assert b"content-length" in head.lower() and json.loads(data)["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------------------
# Streamed tool calls, logprobs


def _sse(s, path: str, body: dict) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", path, json.dumps({"model": "tiny", "stream": True, **body}))
    text = conn.getresponse().read().decode()
    conn.close()
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


def test_streamed_tool_call_starts_with_content_null(scripted):
    scripted.script.pieces = [CALL]
    chunks = _sse(scripted, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER_TOOL], **OFF})
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and "content" in first and first["content"] is None, first
    assert first["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    stream = oai(scripted).chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER_TOOL], stream=True, extra_body=OFF
    )
    calls = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert json.loads(calls[0][0].function.arguments) == {"city": "Paris", "days": 2}
    # A text answer still opens with content "" (as OpenAI's do), then the text.
    scripted.script.pieces = ["Hi", "!"]
    chunks = _sse(scripted, "/v1/chat/completions", {"messages": USER, **OFF})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hi!"


@pytest.fixture(scope="module")
def reference(packed):
    """The model itself, for the log-probabilities the server should report."""
    return load_engine(packed)


def _expected(engine, ids: list[int], k: int) -> tuple[list[float], list[int]]:
    logits = prefill(engine.model, ids, engine.model.make_cache()).astype(mx.float32)
    logprobs = (logits - mx.logsumexp(logits)).tolist()
    order = sorted(range(len(logprobs)), key=lambda i: -logprobs[i])[:k]
    return logprobs, order


def test_chat_logprobs_match_the_model(server, reference):
    tok = reference.tokenizer
    messages = [{"role": "user", "content": "Tell me"}]
    request = dict(
        model="tiny", messages=messages, max_tokens=5, logprobs=True, top_logprobs=3, presence_penalty=0,
        extra_body={"ignore_eos": True, **OFF}, **GREEDY,
    )  # fmt: skip
    r = oai(server).chat.completions.create(**request)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    text = r.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == text
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob  # greedy
    # The first token's numbers are the model's log-softmax after the prompt.
    prompt = tok.apply_chat_template(messages, enable_thinking=False)
    logprobs, order = _expected(reference, tok.encode(prompt), 3)
    assert [bytes(t.bytes) for t in content[0].top_logprobs] == [tok.token_bytes(i) for i in order]
    for t, i in zip(content[0].top_logprobs, order, strict=True):
        assert t.logprob == pytest.approx(logprobs[i], abs=1e-4)

    # Streaming: the same tokens and numbers, spread over the chunks.
    chunks = list(oai(server).chat.completions.create(stream=True, **request))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    for c in chunks:  # each chunk's logprobs are its own text's tokens
        if c.choices and c.choices[0].delta.content:
            assert (
                b"".join(bytes(e.bytes) for e in c.choices[0].logprobs.content).decode(errors="replace")
                == c.choices[0].delta.content
            )

    plain = oai(server).chat.completions.create(**{**request, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    for bad, param in [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ]:
        status, body = _post(server, "/v1/chat/completions", {"messages": messages, **bad})
        assert status == 400 and body["error"]["param"] == param, (bad, body)


def test_completion_logprobs_match_the_model(server, reference):
    tok = reference.tokenizer
    request = dict(
        model="tiny", prompt="The quick brown", max_tokens=6, logprobs=2, presence_penalty=0,
        extra_body={"ignore_eos": True}, **GREEDY,
    )  # fmt: skip
    r = oai(server).completions.create(**request)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    logprobs, order = _expected(reference, tok.encode("The quick brown"), 2)
    assert lp.tokens[0] == tok.token_bytes(order[0]).decode(errors="backslashreplace")
    assert lp.token_logprobs[0] == pytest.approx(logprobs[order[0]], abs=1e-4)
    assert all(
        len(top) <= 2 and max(top.values()) == p
        for top, p in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )

    chunks = list(oai(server).completions.create(stream=True, **request))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [p for s in streamed for p in s.token_logprobs] == lp.token_logprobs
    assert oai(server).completions.create(**{**request, "logprobs": None}).choices[0].logprobs is None
    assert (
        oai(server).completions.create(**{**request, "logprobs": 0}).choices[0].logprobs.top_logprobs[0] == {}
    )
    for bad in (21, -1, True):
        status, body = _post(server, "/v1/completions", {"prompt": "x", "logprobs": bad})
        assert status == 400 and body["error"]["param"] == "logprobs", (bad, body)


def test_cli_cors_flag_reaches_the_server(monkeypatch):
    from click.testing import CliRunner

    import streamer.cli.serve as cli

    seen = {}

    def fake_start(load, config, scripted=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(cli, "start_server", fake_start)
    args = ["--cors", "http://localhost:3000", "--cors", "https://ui.example"]
    assert CliRunner().invoke(cli.serve, args).exit_code == 0
    assert seen["config"].cors_origins == ("http://localhost:3000", "https://ui.example")
    CliRunner().invoke(cli.serve, [])
    assert seen["config"].cors_origins == ()
