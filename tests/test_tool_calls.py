"""The answer parser: reasoning / content / Qwen3.5 tool calls, the same however the text is split."""

from __future__ import annotations

import random

import pytest

from streamer.serve.tool_calls import OutputParser, convert_argument, parse_tool_call
from streamer.text.tokenizer import make_template_environment
from streamer.text.tokenizer_assets import qwen3_5_chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "where": {"type": "object"},
                "ratio": {"type": "number"},
                "note": {"type": ["string", "null"]},
            },
        },
    },
}
SHELL = {"name": "run", "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}}

CALL_TEXT = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


def collect(deltas):
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [(d.call.name, d.call.arguments) for d in deltas if d.kind == "tool_call"]
    return reasoning, content, calls


def parse(pieces, thinking=True, tools=(WEATHER, SHELL)):
    parser = OutputParser(thinking, list(tools) if tools is not None else None)
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return collect(deltas + parser.finish())


def splits(text, seed=0):
    """The text whole, one character at a time, and in random pieces."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3)))
    random_pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return [[text], list(text), random_pieces]


ANSWERS = [
    # (model output, thinking, expected reasoning, content, calls)
    ("I should greet.\n</think>\n\nHello there!", True, "I should greet.", "Hello there!", []),
    ("Just content, no tags.", False, "", "Just content, no tags.", []),
    ("<think>\nHmm.\n</think>\n\nHi", False, "Hmm.", "Hi", []),
    ("Cut off while thinking\n", True, "Cut off while thinking", "", []),
    (
        "Need weather.\n</think>\n\nLet me check.\n\n" + CALL_TEXT,
        True,
        "Need weather.",
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        "x\n</think>\n\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Oslo"),
        True,
        "x",
        "",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo", "days": 3})],
    ),
    (
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls -l\necho '<b>' && cat a < b\n"
        "</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [("run", {"cmd": "ls -l\necho '<b>' && cat a < b"})],
    ),
    ("a < b and <toolbox> are text", False, "", "a < b and <toolbox> are text", []),
    ("mid <think> is text", False, "", "mid <think> is text", []),
]


@pytest.mark.parametrize("case", range(len(ANSWERS)))
def test_answers_parse_the_same_however_split(case):
    text, thinking, *want = ANSWERS[case]
    for pieces in splits(text, seed=case):
        assert parse(pieces, thinking) == tuple(want), pieces


def test_arguments_typed_by_schema():
    body = (
        "<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\n 7 \n</parameter>\n"
        "<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
        '<parameter=where>\n{"lat": 1.5}\n</parameter>\n<parameter=ratio>\n0.25\n</parameter>\n'
        "<parameter=note>\nnull\n</parameter>\n<parameter=extra>\n[1]\n</parameter>\n</function>"
    )
    call = parse_tool_call(body, {"get_weather": WEATHER["function"]["parameters"]["properties"]})
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert call.arguments == {
        "city": "42",  # declared a string: kept verbatim
        "days": 7,
        "metric": True,
        "hours": [1, 2],
        "where": {"lat": 1.5},
        "ratio": 0.25,
        "note": "null",  # string wins over null
        "extra": "[1]",  # undeclared: kept verbatim
    }


def test_convert_argument_falls_back_to_text():
    assert convert_argument("seven", {"type": "integer"}) == "seven"
    assert convert_argument("{broken", {"type": "object"}) == "{broken"
    assert convert_argument("3", {"type": "number"}) == 3
    assert convert_argument("3.5", {"type": "number"}) == 3.5


def test_json_form_and_malformed_calls():
    call = parse_tool_call('{"name": "run", "arguments": {"cmd": "ls"}}', {})
    assert (call.name, call.arguments) == ("run", {"cmd": "ls"})
    assert parse_tool_call("no function here", {}) is None
    # A <tool_call> block without a function comes back as text, not as a call.
    assert parse(["<tool_call>oops</tool_call> done"], False) == ("", "<tool_call>oops</tool_call> done", [])


def test_truncated_call_is_content_not_a_call():
    text = "<tool_call>\n<function=run>\n<parameter=cmd>\nrm -rf /tmp/x"
    assert parse([text], False) == ("", text, [])


def test_without_tools_the_xml_stays_content():
    assert parse([CALL_TEXT], False, tools=None) == ("", CALL_TEXT, [])


def test_streaming_emits_text_before_the_answer_ends():
    parser = OutputParser(thinking=True, tools=[WEATHER])
    assert collect(parser.feed("Let me think")) == ("Let me think", "", [])
    assert collect(parser.feed(" more.\n</thi")) == (" more.", "", [])  # "\n</thi" held back
    assert collect(parser.feed("nk>\n\nAnswer <tool")) == ("", "Answer", [])
    deltas = parser.feed("_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n")
    assert deltas == []  # a call is emitted only when complete
    assert collect(parser.feed("</function>\n</tool_call>")) == ("", "", [("get_weather", {"city": "Rome"})])
    assert parser.finish() == []
    assert [c.name for c in parser.tool_calls] == ["get_weather"]


def test_template_rendered_calls_parse_back():
    """What the chat template writes for a call (its training format) parses to the same call."""
    arguments = {"city": "Paris", "days": 3, "hours": [9, 12], "where": {"lat": 48.9}, "metric": False}
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
        },
    ]
    template = make_template_environment().from_string(qwen3_5_chat_template())
    text = template.render(messages=messages, tools=[WEATHER], add_generation_prompt=False)
    answer = text.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    assert parse([answer], thinking=False) == ("", "Checking.", [("get_weather", arguments)])
