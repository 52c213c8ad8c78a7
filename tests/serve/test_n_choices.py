"""`n > 1` on /v1/chat/completions and /v1/completions: N sequences of one request, decoded in one batch.

Each choice is what a single request with the choice's own seed (the request's seed + i) answers, so a
test fails if seeds are mixed up, reused or dropped; greedy choices equal the n=1 answer. Runs the tiny
random model (float32), where a batch answers exactly as each sequence alone.
"""

from __future__ import annotations

import http.client
import json
import time

from tests.serve.helpers import CALL, GREEDY, WEATHER_TOOL, oai, raw, records_of, settled_totals, stats

OFF = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "seven tigers"}]
TOKENS = 12
SAMPLED = {"temperature": 1.5, "seed": 1234}


def _chat(server, n: int = 1, **kw):
    extra = {"ignore_eos": True, **OFF, **kw.pop("extra_body", {})}
    return oai(server).chat.completions.create(
        model="tiny", messages=USER, max_tokens=TOKENS, n=n, extra_body=extra, **kw
    )


def _complete(server, n: int = 1, **kw):
    return oai(server).completions.create(
        model="tiny", prompt="The ocean", max_tokens=TOKENS, n=n, extra_body={"ignore_eos": True}, **kw
    )


def test_greedy_choices_are_the_single_answer_and_decode_in_one_batch(server):
    largest = stats(server)["batch"]["largest_batch"]
    assert largest < 3  # nothing before this test decoded three sequences together
    r = _chat(server, 3, **GREEDY)
    assert stats(server)["batch"]["largest_batch"] >= 3
    single = _chat(server, **GREEDY).choices[0].message.content
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [single] * 3
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.completion_tokens == 3 * TOKENS
    assert r.usage.prompt_tokens == _chat(server, **GREEDY).usage.prompt_tokens  # counted once
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3 * TOKENS


def test_choices_read_the_prompt_once(server):
    """The N choices share one prefill: the followers adopt the first choice's prompt state."""
    before = settled_totals(server)
    messages = [{"role": "user", "content": "a prompt no other test sends: basket quantum violin river"}]
    r = oai(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, n=3, extra_body={"ignore_eos": True, **OFF, **GREEDY}
    )
    prefilled = sum(record["prefilled_tokens"] for record in records_of(server, r.id, 3))
    assert 0 < prefilled <= r.usage.prompt_tokens  # once, not three times
    after = stats(server)["totals"]
    assert after["requests"] - before["requests"] == 1  # one request ...
    assert after["sequences"] - before["sequences"] == 3  # ... of three answers


def test_seeded_chat_choices_are_the_derived_seeds_answers(server):
    r = _chat(server, 3, **SAMPLED)
    texts = [c.message.content for c in r.choices]
    alone = [
        _chat(server, temperature=1.5, seed=SAMPLED["seed"] + i).choices[0].message.content for i in range(3)
    ]
    assert texts == alone
    assert len(set(texts)) == 3  # distinct seeds: the choices differ
    assert [c.message.content for c in _chat(server, 3, **SAMPLED).choices] == texts  # reproducible


def test_streamed_chat_choices_assemble_to_the_same_answers(server):
    whole = _chat(server, 3, **SAMPLED)
    texts, finish, usage = ["", "", ""], [None] * 3, None
    stream = _chat(server, 3, stream=True, stream_options={"include_usage": True}, **SAMPLED)
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == ["length"] * 3
    assert usage.completion_tokens == 3 * TOKENS and usage.prompt_tokens == whole.usage.prompt_tokens


def test_each_choice_has_its_own_logprobs(server):
    r = _chat(server, 2, logprobs=True, **SAMPLED)
    for c in r.choices:
        assert len(c.logprobs.content) == TOKENS
        joined = b"".join(bytes(t.bytes) for t in c.logprobs.content).decode(errors="replace")
        assert joined.lstrip() == c.message.content  # the parser drops the answer's leading space


def test_completion_choices_streamed_and_not(server):
    r = _complete(server, 3, **SAMPLED)
    texts = [c.text for c in r.choices]
    alone = [_complete(server, temperature=1.5, seed=SAMPLED["seed"] + i).choices[0].text for i in range(3)]
    assert texts == alone and len(set(texts)) == 3
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * TOKENS
    streamed, indexes = ["", "", ""], []
    for chunk in _complete(server, 3, stream=True, **SAMPLED):
        for c in chunk.choices:
            streamed[c.index] += c.text
            indexes.append(c.index)
    assert streamed == texts and set(indexes) == {0, 1, 2}


def test_n_above_the_batch_is_refused_naming_n(server):
    cap = server.worker.batch.max_batch
    for path, body in [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})]:
        data = json.dumps({"model": "tiny", "n": cap + 1, **body}).encode()
        status, err = raw(server, "POST", path, data)
        assert status == 400 and err["error"]["param"] == "n", err
        assert f"at most {cap}" in err["error"]["message"] and "--max-batch" in err["error"]["message"]


def test_a_disconnect_cancels_every_choice(server):
    before = stats(server)["totals"]
    body = {
        "model": "tiny",
        "messages": USER,
        "max_tokens": 50000,
        "n": 3,
        "stream": True,
        "ignore_eos": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    seen = set()
    while len(seen) < 3:  # every choice has started
        line = resp.fp.readline()
        if line.startswith(b"data: "):
            seen.update(c["index"] for c in json.loads(line[6:])["choices"])
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while stats(server)["totals"]["sequences"] < before["sequences"] + 3:
        assert time.monotonic() < deadline, "the abandoned choices never ended"
        time.sleep(0.05)
    totals = stats(server)["totals"]
    assert totals["cancelled"] == before["cancelled"] + 3
    assert totals["completion_tokens"] - before["completion_tokens"] < 3 * 50000


def test_each_choice_has_its_own_tool_calls_and_reasoning(scripted):
    scripted.script.pieces = ["Need it.", "</think>", "\n\n", CALL]
    r = oai(scripted).chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL], n=2)
    assert [c.finish_reason for c in r.choices] == ["tool_calls"] * 2
    calls = [c.message.tool_calls[0] for c in r.choices]
    assert [c.function.name for c in calls] == ["get_weather"] * 2 and calls[0].id != calls[1].id
    assert [c.message.model_extra["reasoning_content"] for c in r.choices] == ["Need it."] * 2
    assert r.usage.completion_tokens == 8 and r.usage.completion_tokens_details.reasoning_tokens == 2
    streamed: dict[int, list] = {0: [], 1: []}
    for chunk in oai(scripted).chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER_TOOL], n=2, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] += c.delta.tool_calls or []
    assert [[t.function.name for t in streamed[i]] for i in (0, 1)] == [["get_weather"]] * 2
