"""Client shortcuts and scripted answers shared by the `streamer serve` tests."""

from __future__ import annotations

import http.client
import json
import time
from contextlib import contextmanager

import anthropic
import openai

from streamer.serve.worker import Job

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


def settled_totals(s, timeout: float = 15) -> dict:
    """``/v1/stats`` totals once the server is idle and every earlier request is recorded (the worker
    records a request just after its answer has gone: a read right after an answer can miss it)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = stats(s)
        if not now["busy"] and now["totals"] == last:
            return now["totals"]
        assert time.monotonic() < deadline, f"the server did not settle within {timeout} s"
        last = now["totals"]
        time.sleep(0.05)


def records_of(s, request_id: str, n: int, timeout: float = 15) -> list[dict]:
    """The ``n`` records ``/v1/stats`` keeps for the request ``request_id`` (labelled with its id, or
    "id/i" for choice i of several), once all are recorded."""
    deadline = time.monotonic() + timeout
    while len(mine := [r for r in stats(s)["recent"] if r["label"].split("/")[0] == request_id]) < n:
        assert time.monotonic() < deadline, f"{n} records of {request_id} not recorded within {timeout} s"
        time.sleep(0.02)
    return mine


def raw(s, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)
