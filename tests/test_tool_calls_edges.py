"""Edges of the answer parser that mutation testing found unguarded (tools/mutation.py tool_calls).

Expected values are written out by hand from the Qwen3.5 tool-call format and the JSON types a schema
declares; none is taken from the parser's own output.
"""

from __future__ import annotations

from streamer.serve.tool_calls import OutputParser, convert_argument, parse_tool_call
from tests.test_tool_calls import CALL_TEXT, WEATHER, collect, parse

ADD_BARE = {"name": "add", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}
ADD_ANTHROPIC = {"name": "add", "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}
ADD_CALL = "<tool_call>\n<function=add>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>"


def test_leading_whitespace_of_the_answer_is_dropped():
    assert parse(["  \n Hello"], thinking=False, tools=None) == ("", "Hello", [])
    assert parse(["\n\n", "  Hi"], thinking=True, tools=None) == ("Hi", "", [])


def test_finish_leaves_the_parser_empty():
    parser = OutputParser(thinking=False, tools=None)
    assert collect(parser.feed("text ") + parser.finish()) == ("", "text", [])
    assert parser.finish() == []


def test_empty_call_block_is_text_and_the_next_call_still_parses():
    text = "<tool_call></tool_call>" + CALL_TEXT
    assert parse([text], thinking=False) == (
        "",
        "<tool_call></tool_call>",
        [("get_weather", {"city": "Paris", "days": 3})],
    )


def test_text_after_a_call_comes_out_in_the_same_feed():
    parser = OutputParser(thinking=False, tools=[WEATHER])
    deltas = parser.feed(CALL_TEXT + "\n\nafter")
    assert collect(deltas) == ("", "after", [("get_weather", {"city": "Paris", "days": 3})])


def test_three_calls_in_one_piece():
    three = CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Oslo") + "\n" + CALL_TEXT.replace("Paris", "Rome")
    cities = [args["city"] for _, args in parse([three], thinking=False)[2]]
    assert cities == ["Paris", "Oslo", "Rome"]


def test_without_possible_tags_text_is_not_held_back():
    parser = OutputParser(thinking=False, tools=None)
    assert collect(parser.feed("Hello")) == ("", "Hello", [])
    # Content has started: no <think> can open now, no tool call is parsed, so nothing is held back.
    assert collect(parser.feed("<")) == ("", "<", [])
    assert collect(parser.feed("abc")) == ("", "abc", [])


def test_a_whole_think_tag_after_text_is_emitted_at_once():
    parser = OutputParser(thinking=False, tools=None)
    assert collect(parser.feed("a <think>")) == ("", "a <think>", [])


def test_think_after_content_started_is_text():
    # The piece boundary puts "<think>" at the start of the buffer, after content was already shown.
    assert parse(["Hello", "<think>x</think>y"], thinking=False, tools=None) == (
        "",
        "Hello<think>x</think>y",
        [],
    )
    assert parse(["Sure.", CALL_TEXT + "<think>hm"], thinking=False) == (
        "",
        "Sure.<think>hm",
        [("get_weather", {"city": "Paris", "days": 3})],
    )


def test_bare_and_anthropic_tools_type_the_arguments():
    assert parse([ADD_CALL], thinking=False, tools=[ADD_BARE]) == ("", "", [("add", {"n": 3})])
    assert parse([ADD_CALL], thinking=False, tools=[ADD_ANTHROPIC]) == ("", "", [("add", {"n": 3})])


def test_malformed_tools_are_skipped():
    junk = [
        "not a tool",
        {"type": "function", "function": {"description": "no name"}},
        {"type": "function", "function": "not a dict"},
        {"name": "add", "parameters": "not a dict"},
    ]
    # The last junk entry names "add" without a schema, so the argument stays text.
    assert parse([ADD_CALL], thinking=False, tools=junk) == ("", "", [("add", {"n": "3"})])
    assert parse([ADD_CALL], thinking=False, tools=[*junk, ADD_BARE]) == ("", "", [("add", {"n": 3})])


def test_tool_without_properties_and_unknown_tool_keep_text():
    no_props = {"name": "add", "parameters": {"type": "object"}}
    assert parse([ADD_CALL], thinking=False, tools=[no_props]) == ("", "", [("add", {"n": "3"})])
    assert parse_tool_call("<function=other>\n<parameter=k>\n1\n</parameter>\n</function>", {}).arguments == {
        "k": "1"
    }


def test_json_form_variants():
    def call(body):
        c = parse_tool_call(body, {})
        return None if c is None else (c.name, c.arguments)

    assert call('{"name": "run", "parameters": {"cmd": "ls"}}') == ("run", {"cmd": "ls"})
    assert call('{"name": "now"}') == ("now", {})
    assert call('{"name": "run", "arguments": "{\\"cmd\\": \\"ls\\"}"}') == ("run", {"cmd": "ls"})
    assert call('{"name": "run", "arguments": "{broken"}') is None
    assert call('{"name": "run", "arguments": [1, 2]}') is None
    assert call('{"arguments": {"cmd": "ls"}}') is None
    assert call('{"name": 5, "arguments": {}}') is None
    assert call("{not json") is None


def test_booleans_only_for_boolean_schemas():
    assert convert_argument("True", {"type": "boolean"}) is True
    assert convert_argument(" FALSE ", {"type": "boolean"}) is False
    assert convert_argument("True", {"type": "integer"}) == "True"


def test_null_spellings():
    nullable = {"type": ["integer", "null"]}
    assert convert_argument("None", nullable) is None
    assert convert_argument("NULL", nullable) is None
    assert convert_argument("5", nullable) == 5
    assert convert_argument("None", {"type": "integer"}) == "None"


def test_integers_and_numbers_by_schema():
    def typed(value, schema_type):
        got = convert_argument(value, {"type": schema_type})
        return type(got).__name__, got

    assert typed("+5", "integer") == ("int", 5)  # int() spellings that JSON does not accept
    assert typed("007", "integer") == ("int", 7)
    assert typed("+5", "object") == ("str", "+5")  # an object is never a bare number
    assert typed(".5", "object") == ("str", ".5")
    assert typed("3", "number") == ("int", 3)  # written without a point: an integer
    assert typed("3.0", "number") == ("float", 3.0)  # written with one: stays a float
    assert typed(".5", "number") == ("float", 0.5)
    assert typed("+2.5", "number") == ("float", 2.5)
    assert typed("1e-3", "number") == ("float", 0.001)
    assert typed("1e3", "number") == ("int", 1000)
