"""POST /v1/responses with the official client: the same answer as the chat completion it
amounts to (whole and streamed, as the Responses event sequence), refusals of what needs
stored state, then structured output and function calls on SmolLM2."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)


@pytest.mark.parametrize("ends", ["length", "stop"])
def test_answer_equals_the_chat_completion_whole_and_streamed(server, ends):
    client = client_for(server)
    messages = [{"role": "system", "content": "t7 t8"}, {"role": "user", "content": "t3 t4 t5"}]
    extra = {}
    if ends == "stop":  # the tiny model never ends by itself: a stop string (an extension) ends it
        text = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                              temperature=0).choices[0].message.content
        extra = {"stop": [text.split()[3]]}
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                          extra_body=extra)
    want, cut = chat.choices[0].message.content, chat.choices[0].finish_reason == "length"
    assert chat.choices[0].finish_reason == ends
    r = client.responses.create(model="tiny", instructions="t7 t8", input="t3 t4 t5", max_output_tokens=12,
                                temperature=0, extra_body=extra)
    assert r.output_text == want and r.object == "response" and r.id.startswith("resp_")
    assert r.status == ("incomplete" if cut else "completed")
    assert (r.incomplete_details.reason if cut else r.incomplete_details) == ("max_output_tokens" if cut else None)
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert [item.type for item in r.output] == ["message"] and r.output[0].content[0].type == "output_text"

    events = list(client.responses.create(model="tiny", instructions="t7 t8", input="t3 t4 t5",
                                          max_output_tokens=12, temperature=0, stream=True, extra_body=extra))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if cut else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == want
    final = events[-1].response
    assert final.output_text == want and final.usage.output_tokens == chat.usage.completion_tokens


def test_an_empty_answer_is_one_empty_message_whole_and_streamed(server):
    client = client_for(server)
    first = client.responses.create(model="tiny", input="t3 t4", max_output_tokens=4, temperature=0).output_text
    stop = {"stop": [first.split()[0]]}  # the answer's first word: nothing is left before it
    r = client.responses.create(model="tiny", input="t3 t4", max_output_tokens=4, temperature=0, extra_body=stop)
    assert r.status == "completed" and [(i.type, i.content[0].text) for i in r.output] == [("message", "")]
    events = list(client.responses.create(model="tiny", input="t3 t4", max_output_tokens=4, temperature=0,
                                          extra_body=stop, stream=True))
    assert [e.type for e in events if "delta" in e.type] == []
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(i.type, i.content[0].text) for i in done] == [("message", "")]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == ""


def test_logprobs_are_the_chat_completions_whole_and_streamed(server):
    client = client_for(server)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t3 t4"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    want = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in chat.choices[0].logprobs.content]
    asked = {"model": "tiny", "input": "t3 t4", "max_output_tokens": 6, "temperature": 0, "top_logprobs": 2,
             "include": ["message.output_text.logprobs"]}

    def entries(logprobs):
        return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in logprobs]

    r = client.responses.create(**asked)
    assert entries(r.output[0].content[0].logprobs) == want and len(want) == 6 and len(want[0][2]) == 2
    events = list(client.responses.create(**asked, stream=True))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert entries(streamed) == want
    assert entries(events[-1].response.output[0].content[0].logprobs) == want
    plain = client.responses.create(model="tiny", input="t3 t4", max_output_tokens=6, temperature=0)
    assert plain.output[0].content[0].logprobs == []  # only when asked for


def test_input_items_become_the_conversation(server):
    client = client_for(server)
    items = [{"role": "developer", "content": "t7"}, {"role": "user", "content": [{"type": "input_text", "text": "t3"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "t9 t10"}]},
             {"type": "message", "role": "user", "content": "t4 t5"}]
    r = client.responses.create(model="tiny", input=items, max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "t7"}, {"role": "user", "content": "t3"},
        {"role": "assistant", "content": "t9 t10"}, {"role": "user", "content": "t4 t5"}])
    assert r.output_text == chat.choices[0].message.content
    # extensions pass through as on the chat endpoint: min_p 1 samples the greedy answer
    sampled = client.responses.create(model="tiny", input=items, max_output_tokens=8, temperature=1,
                                      extra_body={"min_p": 1.0, "seed": 3})
    assert sampled.output_text == r.output_text


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "xml"}}}, "text"),
    ({"max_output_tokens": 0}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"metadata": {"k": 1}}, "metadata"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(server, extra, param):
    body = {"model": "tiny", "input": "t3", **extra}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_and_missing_key(server):
    r = httpx.post(server.url + "/v1/responses", json={"model": "nope", "input": "t3"}, headers=server.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "t3"}).status_code == 401


@pytest.mark.slow
def test_json_schema_format_and_function_calls(real_server):
    client = client_for(real_server)
    r = client.responses.create(model="tiny", input="Invent a person.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)

    question = "What's the weather like in Paris today?"
    r = client.responses.create(model="tiny", input=question, tools=[WEATHER], max_output_tokens=60, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments) == {"city": "Paris"}

    events = list(client.responses.create(model="tiny", input=question, tools=[WEATHER], max_output_tokens=60,
                                          temperature=0, tool_choice="required", stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in added] == ["function_call"] and added[0].name == "get_weather"
    assert json.loads(done[0].arguments) == {"city": "Paris"} and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == done[0].arguments

    # the call and its result go back as input items; the model answers in text
    follow = client.responses.create(model="tiny", max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": question},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert follow.output_text and follow.output[0].type == "message"
