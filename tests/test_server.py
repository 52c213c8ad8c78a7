"""`streamer serve` through the official openai and anthropic clients, on a tiny synthetic model.

Two servers share one packed model: one runs the model (streaming, usage, prefix reuse, concurrency,
disconnects), the other answers from a script through the worker's test seam, so tool calls and
thinking, which a random model never writes, can be checked end to end.
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
from contextlib import contextmanager

import anthropic
import openai
import pytest

from streamer.errors import ConfigError
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.serve.prefix_cache import PrefixCache
from streamer.serve.worker import Finished, GenerationWorker, Job, Piece, StopMatcher
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

GREEDY = {"temperature": 0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


class Script:
    """The scripted model: answers with ``pieces`` and records the prompts it was given (as text)."""

    def __init__(self):
        self.pieces: list[str] = []
        self.prompts: list[str] = []
        self.tokenizer = None
        self.delay_s = 0.0  # a slow prefill

    def __call__(self, job: Job) -> list[str]:
        self.prompts.append(self.tokenizer.decode(job.prompt_ids))
        time.sleep(self.delay_s)
        return list(self.pieces)


@pytest.fixture(scope="module")
def server(packed):
    s = start_server(
        lambda: load_engine(packed), ServeConfig(port=0, model_names=("tiny",))
    ).start_background()
    yield s
    s.close()


@pytest.fixture(scope="module")
def scripted(packed):
    script = Script()
    s = start_server(lambda: load_engine(packed), ServeConfig(port=0, model_names=("tiny",)), scripted=script)
    script.tokenizer = s.worker.engine.tokenizer
    s.script = script
    s.start_background()
    yield s
    s.close()


def oai(s, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def anth(s, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@contextmanager
def setting(s, **values):
    """Temporarily changes the running server's settings."""
    settings = s.httpd.app.settings
    old = {k: getattr(settings, k) for k in values}
    for k, v in values.items():
        setattr(settings, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(settings, k, v)


def stats(s) -> dict:
    return raw(s, "GET", "/v1/stats")[1]


def raw(s, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


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
# Prefix reuse


def test_follow_up_prefills_only_the_new_part(server, packed):
    client = oai(server)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]
    options = {"max_tokens": 6, "extra_body": {"ignore_eos": True}, **GREEDY}
    a = client.chat.completions.create(model="tiny", messages=first, **options)
    tok = server.worker.engine.tokenizer
    history = len(tok.encode(tok.apply_chat_template(first, add_generation_prompt=False)))
    follow = [
        *first,
        {"role": "assistant", "content": "Foxes are quick."},
        {"role": "user", "content": "More?"},
    ]
    b = client.chat.completions.create(model="tiny", messages=follow, **options)
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == history
    record = stats(server)["recent"][-1]
    assert record["label"] == b.id and record["prefilled_tokens"] == b.usage.prompt_tokens - history
    # The restored state answers exactly as a fresh prefill does.
    ids = tok.encode(tok.apply_chat_template(follow))
    with load_engine(packed) as engine:
        tokens = stream_generate(engine.model, engine.tokenizer, ids, make_sampler(SamplingParams()), 6)
        want = engine.tokenizer.decode([r.token for r in tokens])
    assert b.choices[0].message.model_extra["reasoning_content"] == want.strip()


def test_worker_resumes_from_the_end_of_an_answer(packed):
    """An answer's end state is kept: a prompt that extends prompt + answer prefills only the rest."""

    def run(worker, ids, n):
        job = worker.submit(Job(ids, n, SamplingParams(), ignore_eos=True))
        while not isinstance(event := job.events.get(timeout=30), Finished):
            assert isinstance(event, Piece)
        return event

    cached = GenerationWorker(lambda: load_engine(packed), PrefixCache(10**9))
    fresh = GenerationWorker(lambda: load_engine(packed), PrefixCache(0))
    cached.start(), fresh.start()
    try:
        prompt = [11, 12, 13, 14, 15]
        first = run(cached, prompt, 7)
        extended = [*prompt, *first.token_ids, 21, 22]
        second, reference = run(cached, extended, 5), run(fresh, extended, 5)
        assert second.usage.cached_tokens == len(prompt) + 7 - 1  # the last sampled token was never fed
        assert reference.usage.cached_tokens == 0
        assert second.token_ids == reference.token_ids
        # A third turn restores KV from two segments (the first answer's and the second's).
        longer = [*extended, *second.token_ids, 31]
        third, reference = run(cached, longer, 4), run(fresh, longer, 4)
        assert third.usage.cached_tokens == len(extended) + 5 - 1
        assert third.token_ids == reference.token_ids
        (latest,) = [s for s in cached.prefix_cache._entries.values() if len(s.ids) == len(longer) + 3]
        assert [(seg.start, seg.end) for seg in latest.state.segments] == [
            (0, len(prompt) + 6),
            (len(prompt) + 6, len(extended) + 4),
            (len(extended) + 4, len(longer) + 3),
        ]
    finally:
        cached.close(), fresh.close()


def test_prefix_cache_lru_within_budget():
    cache = PrefixCache(max_bytes=100, max_entries=3)
    assert cache.store([1, 2], ["a"], 40) and cache.store([1, 2, 3, 4], ["b"], 40)
    assert cache.lookup([1, 2, 3, 4, 5]).state == ["b"]  # the longest strict prefix
    assert cache.lookup([1, 2, 3, 4]).state == ["a"]  # never the whole prompt: one token must run
    assert cache.lookup([1, 9]) is None and cache.lookup([1]) is None
    cache.store([7, 7], ["c"], 40)  # over 100 bytes: the least recently used ([1, 2, 3, 4]) goes
    assert [1, 2, 3, 4] not in cache and [1, 2] in cache and cache.bytes == 80
    assert not cache.store([8], ["huge"], 101)
    for i in range(5):
        cache.store([9, i], [i], 1)
    assert len(cache) == 3 and cache.stats()["evictions"] == 1 + 4


def test_prefix_cache_counts_shared_parts_once():
    class Part:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    a, b, c = Part(30), Part(20), Part(20)
    cache = PrefixCache(max_bytes=100)
    cache.store([1], "s1", 5, (a,))
    cache.store([1, 2], "s2", 5, (a, b))  # a conversation's later turn shares the first segment
    assert cache.bytes == 5 + 5 + 30 + 20
    assert not cache.store([9], "big", 90, (c,))  # 110 with its shared part: over budget alone
    cache.store([1, 2, 3], "s3", 5, (a, b, c))
    assert cache.bytes == 15 + 70
    cache.store([4], "s4", 20)  # over 100: the oldest goes, but its segment lives on in s2 and s3
    assert [1] not in cache and cache.bytes == 10 + 70 + 20
    cache.store([5], "s5", 5)  # s2 goes, yet frees only its own 5: b is still held by s3
    assert [1, 2] not in cache and cache.bytes == 5 + 70 + 20 + 5
    cache.store([6], "s6", 5)  # s3 goes with the last references to a, b and c
    assert list(cache._entries) == [(4,), (5,), (6,)] and cache.bytes == 30


def test_prefix_cache_evicts_answer_ends_first():
    cache = PrefixCache(max_bytes=30)
    cache.store([1], "boundary", 10, priority=1)
    cache.store([1, 2], "answer", 10, priority=0)
    cache.store([3], "boundary 2", 10, priority=1)
    cache.store([4], "boundary 3", 10, priority=1)  # the answer goes, though the first boundary is older
    assert [1] in cache and [1, 2] not in cache
    cache.store([5, 6], "answer 2", 10, priority=0)
    assert cache.lookup([5, 6, 7]).state == "answer 2"  # a hit shows it is reusable: priority 1 now
    cache.store([8], "boundary 4", 10, priority=1)
    assert [5, 6] in cache and [1] not in cache


def test_stop_matcher_across_pieces():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("abc S") == ("abc ", None)
    assert m.feed("TO") == ("", None)
    assert m.feed("P and more") == ("", "STOP")
    m = StopMatcher(["xyz"])
    assert m.feed("ax") == ("a", None) and m.feed("b") == ("xb", None) and m.flush() == ""


# ---------------------------------------------------------------------------------------------------------
# Thinking and tools through the scripted model


def test_thinking_on_and_off(scripted):
    client = oai(scripted)
    scripted.script.pieces = ["Let me ", "think.\n</th", "ink>\n\n", "Hi ", "there."]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}])
    assert scripted.script.prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    assert r.choices[0].message.content == "Hi there."
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let me think."
    scripted.script.pieces = ["Plain ", "answer."]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hey"}], extra_body=off
    )
    assert scripted.script.prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert (
        r.choices[0].message.content == "Plain answer."
        and "reasoning_content" not in r.choices[0].message.model_extra
    )
    with setting(scripted, thinking=False):  # the server-wide default (--no-think)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}])
        assert scripted.script.prompts[-1].endswith("<think>\n\n</think>\n\n")
    # Anthropic: thinking blocks, and thinking={"type": "disabled"}.
    scripted.script.pieces = ["Reason.\n</think>\n\n", "Answer."]
    m = anth(scripted).messages.create(
        model="tiny", max_tokens=50, messages=[{"role": "user", "content": "q"}]
    )
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == [
        ("thinking", "Reason."),
        ("text", "Answer."),
    ]
    anth(scripted).messages.create(
        model="tiny",
        max_tokens=50,
        messages=[{"role": "user", "content": "q"}],
        thinking={"type": "disabled"},
    )
    assert scripted.script.prompts[-1].endswith("<think>\n\n</think>\n\n")


def test_openai_tool_round_trip(scripted):
    client = oai(scripted)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    scripted.script.pieces = [
        "Need the tool.\n</think>\n\n",
        "Checking.\n\n",
        *re.findall(r".{1,7}", CALL, re.S),
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    assert '"name": "get_weather"' in scripted.script.prompts[-1]  # the tools reached the template
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris",
        "days": 2,
    }
    # Streaming gives the same call.
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], stream=True)
    )
    (streamed,) = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert (
        streamed.function.arguments == call.function.arguments
        and chunks[-1].choices[0].finish_reason == "tool_calls"
    )
    # Send the result back: the arguments arrive as a JSON string and reach the template as a dict.
    messages += [
        {"role": "assistant", "content": "Checking.", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    scripted.script.pieces = ["It is sunny.\n</think>\n\n", "Sunny and 21 C."]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    prompt = scripted.script.prompts[-1]
    # The client dropped the reasoning; the server puts back what the model wrote before the call.
    assert "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\nChecking.\n\n<tool_call>\n" in prompt
    assert (
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>"
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nSunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert r.choices[0].message.content == "Sunny and 21 C." and r.choices[0].finish_reason == "stop"


def test_anthropic_tool_round_trip(scripted):
    client = anth(scripted)
    tool = {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": WEATHER_TOOL["function"]["parameters"],
    }
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    scripted.script.pieces = ["Tool time.\n</think>\n\n", CALL]
    m = client.messages.create(model="tiny", max_tokens=100, messages=messages, tools=[tool])
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["thinking", "tool_use"]
    use = m.content[1]
    assert (
        use.name == "get_weather"
        and use.input == {"city": "Paris", "days": 2}
        and use.id.startswith("toolu_")
    )
    with client.messages.stream(model="tiny", max_tokens=100, messages=messages, tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.content[1].input == use.input and final.stop_reason == "tool_use"
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]},
    ]
    scripted.script.pieces = ["Done.\n</think>\n\n", "Sunny."]
    m = client.messages.create(
        model="tiny", max_tokens=100, messages=messages, tools=[tool], system="Be terse."
    )
    prompt = scripted.script.prompts[-1]
    assert prompt.startswith("<|im_start|>system\n# Tools") and "Be terse." in prompt
    assert "<think>\nTool time.\n</think>\n\n<tool_call>\n<function=get_weather>" in prompt
    assert "<tool_response>\nSunny\n</tool_response>" in prompt
    assert m.content[-1].text == "Sunny." and m.stop_reason == "end_turn"


def test_anthropic_stream_event_sequence(scripted):
    scripted.script.pieces = ["Hm.\n</think>\n\n", "Hello ", "world", " STOP here"]
    with anth(scripted).messages.stream(
        model="tiny", max_tokens=100, messages=[{"role": "user", "content": "hi"}], stop_sequences=["STOP"]
    ) as stream:
        events = [e.type for e in stream if e.type not in ("text", "thinking", "signature", "input_json")]
        final = stream.get_final_message()
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 2
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hello world" and final.stop_reason == "stop_sequence"
    assert final.stop_sequence == "STOP" and final.usage.output_tokens == 4


def test_openai_stop_sequences(scripted):
    scripted.script.pieces = ["one, ", "two, th", "ree, four"]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = oai(scripted).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], stop=["three"], extra_body=off
    )
    assert r.choices[0].message.content == "one, two," and r.choices[0].finish_reason == "stop"


def test_keep_alive_while_waiting(scripted):
    """A queued or slowly prefilling stream gets keep-alives, so clients' read timeouts do not fire."""

    def read(path: str, body: dict) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", scripted.port, timeout=30)
        conn.request("POST", path, json.dumps({"model": "tiny", "stream": True, **body}))
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    scripted.script.pieces, scripted.script.delay_s = ["Late."], 0.6
    messages = [{"role": "user", "content": "hi"}]
    try:
        with setting(scripted, heartbeat_s=0.1):
            openai_text = read("/v1/chat/completions", {"messages": messages})
            anthropic_text = read("/v1/messages", {"messages": messages, "max_tokens": 5})
    finally:
        scripted.script.delay_s = 0.0
    assert openai_text.count(": keep-alive") >= 2 and openai_text.endswith("data: [DONE]\n\n")
    assert anthropic_text.count("event: ping") >= 3 and "event: message_stop" in anthropic_text


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
        {"messages": user, "seed": -1},
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
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "system", "content": "x"}])
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
    with pytest.raises(anthropic.BadRequestError, match="context length"), setting(server, context_length=32):
        client.messages.create(model="tiny", max_tokens=30, messages=user)
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


def test_twenty_concurrent_clients(server):
    before = stats(server)["totals"]["requests"]
    answers, errors = [], []

    def ask(i: int) -> None:
        try:
            if i % 2:
                r = oai(server).chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=3
                )
                answers.append(r.usage.completion_tokens)
            else:
                m = anth(server).messages.create(
                    model="tiny", max_tokens=3, messages=[{"role": "user", "content": f"client {i}"}]
                )
                answers.append(m.usage.output_tokens)
        except Exception as e:  # collected: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(answers) == 20 and all(1 <= n <= 3 for n in answers), answers
    assert stats(server)["totals"]["requests"] - before == 20


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
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "zz", "max_tokens": 50000, "ignore_eos": True}),
    )
    time.sleep(0.5)
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 15
    while stats(server)["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    last = stats(server)["recent"][-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 50000


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
