"""Structured output and forced tool calls through constrained decoding (streamer/generation/constrained.py).

The trained demo model writes Python-like text, never JSON or tool calls of its own accord: every valid
answer below is the grammar's doing, and the unconstrained answers to the same prompts show it.
"""

from __future__ import annotations

import json

import mlx.core as mx
import openai
import pytest

from streamer.generation.constrained import (
    Constraint,
    GrammarError,
    Vocabulary,
    json_grammar,
    tool_call_grammar,
)
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.synthetic.demo import DEMO_ASSET
from streamer.text.tokenizer import Tokenizer
from tests.serve.helpers import anth, oai

USER = [{"role": "user", "content": "Describe a user as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "admin"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def demo():
    s = start_server(
        lambda: load_engine(DEMO_ASSET, resident=True), ServeConfig(port=0, model_names=("demo",))
    ).start_background()
    yield s
    s.close()


def valid(value, schema: dict) -> bool:
    """A JSON-schema check for the few keywords these schemas use (the tests' own, not the sampler's)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(valid(v, props[k]) for k, v in value.items() if k in props)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok and schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"the test's checker does not know {schema}")


def parses_as_object(text: str | None) -> bool:
    try:
        return isinstance(json.loads(text or ""), dict)
    except json.JSONDecodeError:
        return False


# ---- OpenAI chat completions --------------------------------------------------------------------------


def test_json_schema_answer_parses_and_validates(demo):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    r = oai(demo).chat.completions.create(model="demo", messages=USER, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    assert valid(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_streamed(demo):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}}
    chunks = oai(demo).chat.completions.create(
        model="demo", messages=USER, temperature=0, response_format=fmt, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert valid(json.loads(text), SCHEMA)


def test_without_the_constraint_the_same_prompt_is_not_json(demo):
    # What the constraint is up against: greedy, the demo writes Python, not JSON.
    r = oai(demo).chat.completions.create(model="demo", messages=USER, temperature=0, max_tokens=64)
    assert not parses_as_object(r.choices[0].message.content)


def test_json_object_answers_are_objects(demo):
    # The demo rarely closes an object within its budget: of a few seeds, those that finish are objects,
    # and the same seeds unconstrained never write one.
    client = oai(demo)
    finished, unconstrained = [], []
    for seed in range(1, 7):
        kw = {"model": "demo", "messages": USER, "temperature": 1.0, "seed": seed, "max_tokens": 96}
        r = client.chat.completions.create(**kw, response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            finished.append(r.choices[0].message.content)
        unconstrained.append(client.chat.completions.create(**kw).choices[0].message.content)
    assert finished and all(parses_as_object(text) for text in finished)
    assert not any(parses_as_object(text) for text in unconstrained)


@pytest.mark.parametrize(
    "choice, names",
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
def test_forced_tool_call_has_valid_arguments(demo, choice, names):
    r = oai(demo).chat.completions.create(
        model="demo", messages=ASK, temperature=0, tools=TOOLS, tool_choice=choice, max_tokens=200
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in message.tool_calls:
        assert call.function.name in names
        assert valid(json.loads(call.function.arguments), schemas[call.function.name])


def test_without_forcing_the_demo_calls_no_tool(demo):
    r = oai(demo).chat.completions.create(
        model="demo", messages=ASK, temperature=0, tools=TOOLS, tool_choice="auto", max_tokens=64
    )
    assert not r.choices[0].message.tool_calls


def test_forced_single_call_without_parallel_calls(demo):
    r = oai(demo).chat.completions.create(
        model="demo",
        messages=ASK,
        temperature=0,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
    )
    assert len(r.choices[0].message.tool_calls) == 1


# ---- Anthropic messages -------------------------------------------------------------------------------

ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "description": "", "input_schema": t["function"]["parameters"]}
    for t in TOOLS
]


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_anthropic_forced_tool_use(demo, choice):
    m = anth(demo).messages.create(
        model="demo",
        max_tokens=200,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
        tool_choice=choice,
        extra_body={"temperature": 0},
    )
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses
    schemas = {t["name"]: t["input_schema"] for t in ANTHROPIC_TOOLS}
    for block in uses:
        assert choice["type"] == "any" or block.name == choice["name"]
        assert valid(block.input, schemas[block.name])


def test_anthropic_forced_tool_use_streamed(demo):
    with anth(demo).messages.stream(
        model="demo",
        max_tokens=200,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    ) as stream:
        m = stream.get_final_message()
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and valid(uses[0].input, WEATHER)


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema is required"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "must be an object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            "response_format: failed to compile JSON schema",
        ),
        ({"tool_choice": "required"}, "needs at least one tool"),
        ({"tool_choice": "any"}, "tool_choice must be"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
    ],
)
def test_openai_bad_values_are_400s(demo, extra, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        oai(demo).chat.completions.create(model="demo", messages=ASK, **extra)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "choice, fragment",
    [
        ({"type": "tool", "name": "nope"}, "needs the name of one of the tools"),
        ({"type": "sometimes"}, "tool_choice.type must be"),
    ],
)
def test_anthropic_bad_tool_choice_is_400(demo, choice, fragment):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as e:
        anth(demo).messages.create(
            model="demo", max_tokens=20, messages=ASK, tools=ANTHROPIC_TOOLS, tool_choice=choice
        )
    assert fragment in str(e.value)


def test_anthropic_any_without_tools_is_400(demo):
    import anthropic

    with pytest.raises(anthropic.BadRequestError, match="needs at least one tool"):
        anth(demo).messages.create(model="demo", max_tokens=20, messages=ASK, tool_choice={"type": "any"})


# ---- the sampler wrapper alone ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab():
    tokenizer = Tokenizer(DEMO_ASSET)
    return tokenizer, Vocabulary.from_file(DEMO_ASSET / "tokenizer.json", tokenizer.eos_token_ids)


def drive(sampler, prefer: list[int], size: int, steps: int) -> list[int]:
    """Runs ``sampler`` on logits that rank ``prefer`` first (in order), as a model would offer them."""
    out = []
    for _ in range(steps):
        logits = [0.0] * size
        for rank, token in enumerate(prefer):
            logits[token] = 100.0 - rank
        out.append(sampler(mx.array(logits)))
        if out[-1] in (4063, 4065):
            break
    return out


def test_mask_keeps_the_grammar_and_ends_with_eos(vocab):
    tokenizer, v = vocab
    want = tokenizer.encode('{"a":1}')
    eos = v.eos_ids
    # The "model" prefers text that is not JSON; the grammar lets through only its own next tokens.
    sampler = Constraint(
        v,
        json_grammar(
            {
                "type": "object",
                "properties": {"a": {"enum": [1]}},
                "required": ["a"],
                "additionalProperties": False,
            }
        ),
    ).wrap(make_sampler(SamplingParams(temperature=0)))
    got = drive(sampler, tokenizer.encode("hello world") + want, 4096 + 64, 20)  # padded embedding rows too
    assert tokenizer.decode(got[:-1]) == '{"a":1}' and got[-1] in eos


def test_constraint_starts_after_the_thinking(vocab):
    tokenizer, v = vocab
    close = tokenizer.token_id("</think>")
    plain = tokenizer.encode("plan")
    sampler = Constraint(v, json_grammar({"enum": [7]}), start_after=close).wrap(
        make_sampler(SamplingParams(temperature=0))
    )
    # Free tokens until </think>, then only the grammar: "7" and an end.
    assert drive(sampler, plain, 4096, 1) == plain[:1]
    assert drive(sampler, [close], 4096, 1) == [close]
    after = drive(sampler, plain + tokenizer.encode("7"), 4096, 3)
    assert tokenizer.decode(after[:-1]) == "7" and after[-1] in v.eos_ids


def test_tool_call_grammar_accepts_the_template_format(vocab):
    tokenizer, v = vocab
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\na < b\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    ids = tokenizer.encode(text)
    assert Constraint(v, tool_call_grammar(TOOLS)).matcher.validate_tokens(ids) == len(ids)
    # Only the named function, and arguments must meet the schema (days <= 14).
    assert Constraint(v, tool_call_grammar(TOOLS, ["get_time"])).matcher.validate_tokens(ids) < len(ids)
    too_many = tokenizer.encode(text.replace("\n3\n", "\n30\n"))
    assert Constraint(v, tool_call_grammar(TOOLS)).matcher.validate_tokens(too_many) < len(too_many)


def test_bad_schema_is_a_grammar_error(vocab):
    with pytest.raises(GrammarError, match="Invalid type"):
        Constraint(vocab[1], json_grammar({"type": "nonsense"}))
