"""`streamer serve` under random requests (hypothesis): never a 5xx, never a hang, alive afterwards.

Bodies mix the fields each API knows, with values of any JSON type and size, random JSON documents and
raw bytes; headers vary content type, auth and extras. The model is the worker's scripted seam, so each
request that passes validation costs no compute and the run stays well under a minute. Every request
has a client timeout: a request the server never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from streamer.loader import load_engine  # noqa: E402
from streamer.serve.http import ServeConfig, start_server  # noqa: E402
from streamer.storage.repack import run_repack  # noqa: E402
from streamer.storage.repack_plan import make_plan  # noqa: E402
from streamer.synthetic.writer import generate  # noqa: E402

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"]
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "stream_options",
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "repetition_penalty", "stop",
    "stop_sequences", "tools", "tool_choice", "system", "thinking", "chat_template_kwargs", "ignore_eos",
    "n", "logprobs", "echo", "metadata", "reasoning_effort", "response_format",
]  # fmt: skip
ASCII = st.characters(min_codepoint=32, max_codepoint=126)
CLIENT_TIMEOUT_S = 20


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
content = st.one_of(
    st.text(max_size=200),
    st.integers(0, 20_000).map(lambda n: "word " * n),  # large prompts
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "x"])},
            optional={"text": json_values, "id": json_values, "content": json_values, "input": json_values},
        ),
        max_size=3,
    ),
    json_values,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "bogus"]) | json_values},
    optional={
        "content": content,
        "tool_calls": json_values,
        "tool_call_id": json_values,
        "name": json_values,
        "reasoning_content": json_values,
    },
)
plausible = {
    "model": st.sampled_from(["tiny", "other"]) | json_values,
    "messages": st.lists(message, max_size=4) | json_values,
    "prompt": st.text(max_size=200) | st.lists(st.integers(-5, 1000), max_size=20) | json_values,
    "max_tokens": st.integers(-3, 10**6) | json_values,
    "stream": st.booleans() | json_values,
    "temperature": st.floats(allow_nan=True) | json_values,
    "stop": st.lists(st.text(max_size=5), max_size=20) | json_values,
}
USER = [{"role": "user", "content": "hi"}]
VALID = {  # one valid body per endpoint: mutated versions reach the code behind validation
    "/v1/chat/completions": {"model": "tiny", "messages": USER},
    "/v1/completions": {"model": "tiny", "prompt": "hi"},
    "/v1/messages": {"model": "tiny", "max_tokens": 5, "messages": USER},
    "/v1/messages/count_tokens": {"model": "tiny", "messages": USER},
}
field_values = st.fixed_dictionaries({}, optional={f: plausible.get(f, json_values) for f in FIELDS})


@st.composite
def bodies(draw, path: str):
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "fields", "json", "bytes"]))
    if kind == "mutated":
        body = {**VALID[path], **draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2))}
        return {**body, **draw(st.fixed_dictionaries({}, optional={"stream": st.booleans()}))}
    if kind == "fields":
        return draw(field_values)
    return draw(json_values if kind == "json" else st.binary(max_size=300))


headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "application/json; charset=latin-1"]
        )
        | st.text(ASCII, max_size=30),
        "Authorization": st.text(ASCII, max_size=40),
        "x-api-key": st.text(ASCII, max_size=40),
        "anthropic-version": st.text(ASCII, max_size=20),
        "Accept": st.text(ASCII, max_size=20),
        "X-Anything": st.text(ASCII, max_size=200),
    },
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    pieces = [
        "<think>\n",
        "hm",
        "\n</think>\n\n",
        "Hello",
        " there",
        "<tool_call>\n<function=f>\n</function>",
    ]
    s = start_server(
        lambda: load_engine(root / "packed"),
        ServeConfig(port=0, model_names=("tiny",), default_max_tokens=8),
        scripted=lambda job: pieces,
    ).start_background()
    yield s
    s.close()


def _request(s, method: str, path: str, body: bytes | None, hdrs: dict) -> tuple[int, bytes, bool]:
    """(status, body, whether it is an event stream); a server that does not answer raises a timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") == "text/event-stream"
    finally:
        conn.close()


def _check_answer(status: int, data: bytes, streamed: bool) -> None:
    assert status < 500, (status, data[:500])
    if streamed:
        assert status == 200
        text = data.decode()
        assert text.startswith(("data: ", "event: ", ": keep-alive")), text[:200]
        assert '"server_error"' not in text and '"api_error"' not in text, text[-500:]
    else:
        doc = json.loads(data)  # every answer, error or not, is JSON in the API's format
        assert isinstance(doc, dict) and ("error" in doc) == (status >= 400), doc


@settings(
    max_examples=120,
    deadline=15_000,
    derandomize=True,  # the same examples every run: a failure here is a bug, not noise
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data(), path=st.sampled_from(ENDPOINTS), hdrs=headers)
def test_random_requests_never_500_or_hang(server, data, path, hdrs):
    body = data.draw(bodies(path), label="body")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN as Python writes it
    _check_answer(*_request(server, "POST", path, raw, hdrs))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": []}]}),  # found by the fuzzer: was a 500
        ("/v1/completions", {"prompt": 5, "max_tokens": 2}),
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": {"x": 1}, "content": "x"}]}),
        ("/v1/chat/completions", {"messages": USER, "stream": True, "temperature": float("nan")}),
    ],
)
def test_requests_the_fuzzer_found(server, path, body):
    _check_answer(*_request(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "text/plain"}))


@settings(max_examples=30, deadline=15_000, derandomize=True, database=None)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]), path=st.text(ASCII, max_size=40))
def test_random_methods_and_paths(server, method, path):
    status, data, _ = _request(server, method, "/" + path.lstrip("/").replace(" ", "%20"), None, {})
    assert status < 500 and isinstance(json.loads(data), dict), (status, data[:300])


def test_alive_and_idle_after_fuzzing(server):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, data, _ = _request(server, "GET", "/v1/stats", None, {})
        stats = json.loads(data)
        if not stats["busy"] and stats["queued"] == 0:
            break
        time.sleep(0.05)
    assert status == 200 and not stats["busy"] and stats["queued"] == 0
    assert _request(server, "GET", "/health", None, {})[0] == 200
    body = {"model": "tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 5}
    status, data, _ = _request(server, "POST", "/v1/chat/completions", json.dumps(body).encode(), {})
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == "Hello there"
