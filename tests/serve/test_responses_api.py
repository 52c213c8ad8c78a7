"""The OpenAI Responses API (POST /v1/responses) through the official client: the trained demo model for
real answers and constrained output, the scripted model for what the demo never writes (reasoning, tool
calls of its own accord) and to see the prompts the server builds."""

from __future__ import annotations

import json

import openai
import pytest

from streamer.generation.constrained import IJSON_MAX_INT
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.synthetic.demo import DEMO_ASSET
from tests.serve.helpers import CALL, oai, raw

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def demo():
    s = start_server(
        lambda: load_engine(DEMO_ASSET, resident=True), ServeConfig(port=0, model_names=("demo",))
    ).start_background()
    yield s
    s.close()


# ---- the demo model -----------------------------------------------------------------------------------


def test_text_answer_with_usage(demo):
    r = oai(demo).responses.create(
        model="demo", input="Hello", instructions="Answer in Python.", max_output_tokens=12, temperature=0
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "demo"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and r.output_text
    assert r.usage.output_tokens == 12 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 12


def test_stream_event_sequence_and_text_match(demo):
    client = oai(demo)
    kw = {"model": "demo", "input": [{"role": "user", "content": "Hello"}], "max_output_tokens": 12}
    whole = client.responses.create(**kw, temperature=0)
    events = list(client.responses.create(**kw, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == whole.output_text
    assert events[-1].response.output_text == text


def test_json_schema_text_format(demo):
    fmt = {"type": "json_schema", "name": "user", "schema": SCHEMA, "strict": True}
    r = oai(demo).responses.create(
        model="demo", input="Describe a user as JSON.", text={"format": fmt}, temperature=0
    )
    value = json.loads(r.output_text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 24
    # The same request without the format: the demo writes Python, not JSON.
    plain = oai(demo).responses.create(
        model="demo", input="Describe a user as JSON.", temperature=0, max_output_tokens=64
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.output_text)


def valid_weather_arguments(arguments: dict) -> bool:
    """``arguments`` against WEATHER's schema (the test's own check, not the sampler's). ``days`` sets no
    bound, so the grammar keeps it within I-JSON's ±(2**53 - 1) (streamer/generation/constrained.py)."""
    city, days = arguments.get("city"), arguments.get("days", 0)
    return (
        set(arguments) <= {"city", "days"}
        and isinstance(city, str)
        and len(city) <= 30
        and isinstance(days, int)
        and not isinstance(days, bool)
        and abs(days) <= IJSON_MAX_INT
    )


# One call each (parallel_tool_calls off): greedy, the demo may follow a finished call with another one
# and another (the grammar allows that when calls are parallel), which says nothing about the constraint.
@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_call(demo, choice):
    r = oai(demo).responses.create(
        model="demo",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
    )
    assert r.status == "completed"
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert valid_weather_arguments(json.loads(call.arguments)), call.arguments
    # The same request without the tool choice: the demo writes Python, not a call.
    free = oai(demo).responses.create(
        model="demo", input="Weather in Paris?", tools=[WEATHER], temperature=0, max_output_tokens=64
    )
    assert [item.type for item in free.output] == ["message"]


def test_forced_function_call_streamed_through_the_helper(demo):
    with oai(demo).responses.stream(
        model="demo",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    [call] = final.output
    assert call.type == "function_call" and valid_weather_arguments(json.loads(call.arguments))


# ---- the scripted model -------------------------------------------------------------------------------


def test_reasoning_item_and_effort(scripted):
    scripted.script.pieces = ["I should ", "greet.", "</think>", "\n\nHi!"]
    r = oai(scripted).responses.create(model="tiny", input="Hello", reasoning={"effort": "high"})
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "I should greet."
    assert message.type == "message" and r.output_text == "Hi!"
    assert scripted.script.prompts[-1].endswith("<think>\n")
    # The tokens before </think> (the scripted model writes one token per piece).
    assert r.usage.output_tokens == 4 and r.usage.output_tokens_details.reasoning_tokens == 2
    scripted.script.pieces = ["Hi!"]
    r = oai(scripted).responses.create(model="tiny", input="Hello", reasoning={"effort": "none"})
    assert r.output_text == "Hi!" and "<think>\n\n</think>" in scripted.script.prompts[-1]
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_reasoning_streamed(scripted):
    scripted.script.pieces = ["plan", "</think>", "answer"]
    events = list(
        oai(scripted).responses.create(model="tiny", input="Hi", reasoning={"effort": "low"}, stream=True)
    )
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 1


def test_tool_round_trip(scripted):
    client = oai(scripted)
    scripted.script.pieces = [CALL]
    off = {"reasoning": {"effort": "none"}}
    first = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], **off)
    [call] = first.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert "get_weather" in scripted.script.prompts[-1]  # the tool is shown to the model
    scripted.script.pieces = ["It is sunny."]
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"},
    ]
    second = client.responses.create(model="tiny", input=items, tools=[WEATHER], **off)
    assert second.output_text == "It is sunny."
    prompt = scripted.script.prompts[-1]
    assert "<function=get_weather>" in prompt and "<parameter=city>\nParis" in prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt


def test_function_call_streamed(scripted):
    scripted.script.pieces = [CALL]
    events = list(
        oai(scripted).responses.create(
            model="tiny", input="Weather?", tools=[WEATHER], reasoning={"effort": "none"}, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(events[4].arguments) == {"city": "Paris", "days": 2}


def test_instructions_and_content_parts(scripted):
    scripted.script.pieces = ["ok"]
    oai(scripted).responses.create(
        model="tiny",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use French."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bonjour"}]},
        ],
        reasoning={"effort": "minimal"},
    )
    assert "<|im_start|>system\nBe brief.\n\nUse French.<|im_end|>" in scripted.script.prompts[-1]


@pytest.mark.parametrize(
    "extra, fragment, param",
    [
        ({"previous_response_id": "resp_1"}, "stores no responses", "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference' is not supported", "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "part 'input_image'", "input"),
        ({"tools": [{"type": "web_search"}]}, "tool type 'web_search' is not supported", "tools"),
        ({"tool_choice": "required"}, "needs at least one tool", "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}},
            "not among the tools",
            "tool_choice",
        ),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort must be one of", "reasoning"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type must be", "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens must be in", "max_output_tokens"),
        ({"max_output_tokens": 10**7}, "maximum context length", "input"),
    ],
)
def test_bad_requests_are_openai_400s(scripted, extra, fragment, param):
    body = {"model": "tiny", "input": "Hi", **extra}
    status, err = raw(scripted, "POST", "/v1/responses", json.dumps(body).encode())
    assert status == 400 and fragment in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        oai(scripted).responses.create(**body)


def test_missing_input_is_400(scripted):
    status, err = raw(scripted, "POST", "/v1/responses", json.dumps({"model": "tiny"}).encode())
    assert status == 400 and err["error"]["message"] == "input is required"
