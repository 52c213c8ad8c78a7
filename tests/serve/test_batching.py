"""`streamer serve` batching: --max-batch caps the batch, --max-state-gb queues what does not fit and
refuses what never can, and every answer equals the same request answered alone."""

from __future__ import annotations

import json
import threading

from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.serve.worker import BatchSettings
from tests.serve.helpers import GREEDY, oai, raw, stats

PROMPTS = ["one two three", "violin", "a b c d e f g h i j k l m n o p", "ocean stone", "seven tigers"]


def _ask(server, content: str, max_tokens: int = 12) -> str:
    r = oai(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        extra_body={**GREEDY, "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True},
    )
    return r.choices[0].message.content


def _ask_all(server) -> dict[int, str]:
    answers, errors = {}, []

    def one(i):
        try:
            answers[i] = _ask(server, PROMPTS[i])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return answers


def _server(packed, batch: BatchSettings):
    config = ServeConfig(port=0, model_names=("tiny",), prefix_cache_bytes=0, batch=batch)
    return start_server(lambda: load_engine(packed), config).start_background()


def test_state_budget_caps_the_batch_and_answers_stay_exact(packed):
    with load_engine(packed) as engine:
        # Room for two of these requests at their longest (prompt + max_tokens), not three.
        two = 2 * engine.model.state_bytes(64) + 1
    server = _server(packed, BatchSettings(max_batch=8, max_state_bytes=two))
    try:
        answers = _ask_all(server)
        batch = stats(server)["batch"]
        alone = {i: _ask(server, p) for i, p in enumerate(PROMPTS)}
    finally:
        server.close()
    assert batch["largest_batch"] == 2 and batch["reserved_state_bytes"] == 0
    assert answers == alone


def test_max_batch_one_decodes_one_at_a_time(packed):
    server = _server(packed, BatchSettings(max_batch=1))
    try:
        answers = _ask_all(server)
        batch = stats(server)["batch"]
    finally:
        server.close()
    assert batch["largest_batch"] == 1 and batch["decode_steps"] == batch["decoded_tokens"]
    assert len(answers) == len(PROMPTS)


def test_a_request_that_can_never_fit_is_refused_with_the_flag_to_raise(packed):
    with load_engine(packed) as engine:
        budget = engine.model.state_bytes(300)
    server = _server(packed, BatchSettings(max_state_bytes=budget))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
        status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400, answer
        assert "--max-state-gb" in answer["error"]["message"]
        # The server goes on: a request that fits is answered.
        assert _ask(server, "hi", max_tokens=3)
    finally:
        server.close()
