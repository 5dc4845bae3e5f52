"""Function calling: request validation and call parsing (no model), then forced calls,
multi-turn messages and streamed calls over HTTP with the official client on SmolLM2."""

from __future__ import annotations

import json

import openai
import pytest

from loragate.engine.errors import InvalidRequestError
from loragate.gateway.protocol import chat_messages
from loragate.gateway.tool_calls import StreamedCalls, ToolPlan, check_template, parse_tool_plan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
HERMES_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %} reply with <tool_call>{...}</tool_call>"


@pytest.mark.parametrize("body, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_refused(body, param):
    with pytest.raises(InvalidRequestError) as e:
        parse_tool_plan(body)
    assert e.value.param == param


def test_tool_choice_modes():
    assert parse_tool_plan({}) is None and parse_tool_plan({"tool_choice": "none"}) is None
    assert parse_tool_plan({"tools": [WEATHER]}).mode == "auto"
    named = parse_tool_plan({"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert (named.mode, named.name) == ("named", "add")
    none = parse_tool_plan({"tools": [WEATHER], "tool_choice": "none"})
    assert none.shown is None and none.grammar() is None
    check_template(named, None)  # forced calls need nothing of the template
    with pytest.raises(InvalidRequestError, match="Hermes"):
        check_template(parse_tool_plan({"tools": [WEATHER]}), "{{ messages }}")
    check_template(parse_tool_plan({"tools": [WEATHER]}), HERMES_TEMPLATE)


def test_calls_are_parsed_from_the_text():
    auto = ToolPlan([WEATHER, ADD], "auto")
    two = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
          '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    message, finish = auto.message(two, "stop")
    assert finish == "tool_calls" and message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    bare, _ = auto.message('{"name": "add", "arguments": {"a": 1}}', "stop")  # the tags left out
    assert bare["content"] is None and bare["tool_calls"][0]["function"]["name"] == "add"
    # untagged calls a text starts with (a small model's habit), the rest of the text kept as content
    text = '{"name": "add", "arguments": {"a": 1}}\n{"name": "get_weather", "arguments": {"city": "Oslo"}} ' \
           '{"name": "get_weather_args", "type": "object"}'
    bare, finish = auto.message(text, "stop")
    assert finish == "tool_calls" and [c["function"]["name"] for c in bare["tool_calls"]] == ["add", "get_weather"]
    assert bare["content"] == '{"name": "get_weather_args", "type": "object"}'
    deltas, reason = stream(auto, text)
    assert reason == "tool_calls" and len(deltas) == 1 and deltas[0]["content"] == bare["content"]
    assert [c["function"]["name"] for c in deltas[0]["tool_calls"]] == ["add", "get_weather"]
    for text in ('Use {"name": "add", "arguments": {}}', '{"name": "add", "arguments": 5}', '{"name": "add"'):
        assert auto.message(text, "stop") == ({"role": "assistant", "content": text}, "stop")  # not calls
    for text in ("Just text.", '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>",
                 "[" * 5000 + "]" * 5000):  # nested past the JSON parser's limit: text, not a crash
        assert auto.message(text, "stop") == ({"role": "assistant", "content": text}, "stop")
    cut = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert auto.message(cut, "length") == ({"role": "assistant", "content": cut}, "length")
    named, finish = ToolPlan([WEATHER], "named", "get_weather").message('{"city": "Rome"}', "stop")
    assert finish == "stop" and named["content"] is None and named["tool_calls"][0]["function"]["arguments"] == \
        '{"city": "Rome"}'
    required, finish = ToolPlan([WEATHER], "required").message('[{"name": "get_weather", "arguments": {"city": "Rome"}}]',
                                                             "stop")
    assert finish == "tool_calls" and json.loads(required["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    single = parse_tool_plan({"tools": [WEATHER, ADD], "parallel_tool_calls": False})
    assert len(single.message(two, "stop")[0]["tool_calls"]) == 1


def stream(plan, text, finish_reason="stop", step=3):
    """Feed `text` in pieces of `step` characters; returns the deltas and the finish_reason."""
    s, deltas = StreamedCalls(plan), []
    for end in range(step, len(text), step):
        deltas.append(s.delta(text[:end]))
    last, reason = s.final(text, finish_reason)
    return [d for d in deltas + [last] if d], reason


@pytest.mark.parametrize("family, text", [
    ("llama 3.x", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                  '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    ("llama 3.x, marker dropped", '{"name": "get_weather", "parameters": {"city": "Oslo"}};'
                                  '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                '{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("mistral, marker dropped", '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                                '{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("granite / phi-4-mini", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                             '{"name": "add", "arguments": {"a": 1, "b": 2}}]<|/tool_call|>'),
])
def test_other_families_json_calls_are_parsed(family, text):
    auto = ToolPlan([WEATHER, ADD], "auto")
    message, finish = auto.message(text, "stop")
    assert finish == "tool_calls" and message["content"] is None, family
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    deltas, reason = stream(auto, text)  # held from the first character: nothing streams as content
    assert reason == "tool_calls" and len(deltas) == 1 and "content" not in deltas[0]
    assert [c["function"]["name"] for c in deltas[0]["tool_calls"]] == ["get_weather", "add"]
    for not_calls in ('[1, 2, 3] are numbers', '[{"name": "rm", "arguments": {}}]', '[TOOL_CALLS] oops'):
        assert auto.message(not_calls, "stop") == ({"role": "assistant", "content": not_calls}, "stop")
        streamed, _ = stream(auto, not_calls)
        assert "".join(d.get("content", "") for d in streamed) == not_calls
    llama_like = '{% if tools %}Respond in the format {"name": function name, "parameters": ...}{% endif %}'
    check_template(auto, llama_like)
    check_template(auto, "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]")


def test_streamed_text_flows_and_calls_come_at_the_end():
    auto = ToolPlan([WEATHER], "auto")
    plain = "Sure <b>bold</b> and a < sign, no call <tool_ here."
    deltas, reason = stream(auto, plain)
    assert "".join(d["content"] for d in deltas) == plain and reason == "stop" and len(deltas) > 5
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    deltas, reason = stream(auto, text)
    assert reason == "tool_calls" and all("tool_calls" not in d for d in deltas[:-1])
    assert "".join(d.get("content", "") for d in deltas) == "Let me check. "  # streamed before the tag
    call = deltas[-1]["tool_calls"][0]
    assert call["index"] == 0 and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    for bare in ('{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                 '\n  {"name": "get_weather", "arguments": {"city": "Oslo"}}'):  # whitespace first: still held
        deltas, reason = stream(auto, bare, step=1)
        assert reason == "tool_calls" and len(deltas) == 1 and "content" not in deltas[0]
    args = '{"city": "Oslo"}'
    deltas, reason = stream(ToolPlan([WEATHER], "named", "get_weather"), args)
    assert reason == "stop" and deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == args
    assert all("id" not in d["tool_calls"][0] for d in deltas[1:])


def test_earlier_calls_and_tool_results_reach_the_template():
    messages = chat_messages({"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}]})
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object, as templates expect
    assert messages[2] == {"role": "tool", "content": "-3 C, snow", "tool_call_id": "call_1"}
    with pytest.raises(InvalidRequestError):
        chat_messages({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]})
    text_parts = chat_messages({"messages": [{"role": "assistant", "content": [{"type": "text", "text": "On it."}],
                                              "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]})
    assert text_parts[0]["content"] == "On it."


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("message", [
    {"role": "user", "content": [{"type": "text", "text": 5}]},
    {"role": "user", "content": [{"type": "text", "text": ["a"]}]},
    {"role": "assistant", "content": 5, "tool_calls": [CALL]},
    {"role": "assistant", "content": {"a": 1}, "tool_calls": [CALL]},
    {"role": "assistant", "content": None, "tool_calls": True},
    {"role": "assistant", "content": None, "tool_calls": {"a": 1}},
])
def test_malformed_messages_are_refused(message):
    with pytest.raises(InvalidRequestError) as e:
        chat_messages({"messages": [message]})
    assert e.value.param == "messages"


@pytest.fixture
def client(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="key-a", max_retries=0)


CITIES = {"What's the weather like in Paris today?": "Paris", "Is it raining in London?": "London"}


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_come_back_as_tool_calls(client, choice):
    for question, city in CITIES.items():
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                           tools=[WEATHER], tool_choice=choice, max_tokens=60, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": city}
        assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")


@pytest.mark.slow
def test_streamed_call_and_a_tool_result_turn(client):
    question = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=60, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(0, "get_weather", {"city": "Paris"})]
    named = list(client.chat.completions.create(
        model="tiny", messages=question, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0, stream=True))
    pieces = [tc for ch in named for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(pieces) > 1 and pieces[0].function.name == "get_weather" and pieces[0].id
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Paris"}
    assert chunks[-1].usage.completion_tokens > 0
    history = question + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump(exclude={"index"})]},
                          {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model="tiny", messages=history, max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:  # this model's template knows no tools
        client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER], max_tokens=8)
    assert e.value.body["param"] == "tool_choice"
