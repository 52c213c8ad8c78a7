"""`streamer serve` end to end with a scripted model (the worker's test seam): thinking and tool calls,
which a random model never writes, through both official clients."""

from __future__ import annotations

import http.client
import json
import re

from tests.serve.helpers import CALL, WEATHER_TOOL, anth, oai, setting

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
