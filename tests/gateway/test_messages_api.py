"""Anthropic's Messages API through the official `anthropic` client: answers equal to the chat
completion the request amounts to, streamed events that rebuild the same message, stop
sequences, forced tool use and a tool-result turn (SmolLM2), token counting, Anthropic-shaped
errors, and tenants (the key as x-api-key)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from loragate.engine.errors import InvalidRequestError
from loragate.gateway.messages_protocol import chat_body_from

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}


# Anthropic's API (and so its client) no longer takes temperature; older clients send it, and
# vLLM's Messages endpoint and this one follow it
GREEDY = {"temperature": 0}


def clients(server, key="key-a"):
    return (anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0),
            openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0))


def test_a_message_is_the_chat_completion_it_amounts_to(server):
    claude, oa = clients(server)
    asked = dict(model="tiny", max_tokens=6, extra_body=GREEDY, system="t3 t4",
                 messages=[{"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t7"},
                           {"role": "user", "content": [{"type": "text", "text": "t8 "}, {"type": "text", "text": "t9"}]}])
    message = claude.messages.create(**asked)
    chat = oa.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "t3 t4"}, {"role": "user", "content": "t5 t6"},
        {"role": "assistant", "content": "t7"}, {"role": "user", "content": "t8 t9"}])
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == \
        (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert claude.messages.count_tokens(model="tiny", system=asked["system"],
                                        messages=asked["messages"]).input_tokens == chat.usage.prompt_tokens

    with claude.messages.stream(**asked) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert [(b.type, b.text) for b in final.content] == [("text", message.content[0].text)]
    assert final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens


def test_a_stop_sequence_is_named(server):
    claude, _ = clients(server)
    body = dict(model="tiny", max_tokens=8, extra_body=GREEDY, messages=[{"role": "user", "content": "t5 t6 t7"}])
    words = claude.messages.create(**body).content[0].text.split()
    assert len(words) >= 2, words  # the tiny model's greedy answer (it needs two words for this test)
    stopped = claude.messages.create(stop_sequences=["t1000", words[1]], **body)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", words[1])
    assert words[1] not in stopped.content[0].text
    with claude.messages.stream(stop_sequences=[words[1]], **body) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", words[1])


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "t5"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "t5"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "t5"}]}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f",
                                                                   "input": {}}]}]}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "system": [{"type": "image"}]}, "system"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "stop_sequences": "t5"}, "stop_sequences"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "tools": [WEATHER],
      "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "thinking": {"type": "maybe"}}, "thinking"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "mcp_servers": [{"url": "x"}]}, "mcp_servers"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "t5"}], "output_config": {"format": {"type": "xml"}}},
     "output_config"),
])
def test_requests_that_cannot_be_served_are_named(body, param):
    with pytest.raises(InvalidRequestError) as e:
        chat_body_from({"model": "tiny", **body})
    assert e.value.param == param


def test_models_are_listed_as_anthropics_client_reads_them(server):
    claude, _ = clients(server)
    models = claude.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].type == "model"
    assert claude.models.retrieve("tiny").created_at.year >= 2026
    assert httpx.get(server.url + "/v1/models", headers=server.headers()).json()["object"] == "list"  # OpenAI's


def test_errors_have_anthropics_shape_and_tenants_hold(server):
    url = server.url + "/v1/messages"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "t5"}]}
    r = httpx.post(url, headers={"x-api-key": "key-a"}, json=body)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(url, headers={"x-api-key": "wrong"}, json={**body, "max_tokens": 4})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):  # another tenant's adapter, or none of that name
        clients(server, "key-b")[0].messages.create(model="nobody", max_tokens=4, messages=body["messages"])
    assert server.state.tenant_in_flight == {}


def test_a_chat_body_carries_the_messages_tools_and_sampling():
    chat = chat_body_from({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "be brief"}], "top_k": 3,
        "stop_sequences": ["END"], "tools": [WEATHER], "metadata": {"user_id": "u"},
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                       {"type": "text", "text": "Checking."},
                                                       {"type": "tool_use", "id": "tu_1", "name": "get_weather",
                                                        "input": {"city": "Paris"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1",
                                                   "content": [{"type": "text", "text": "18 C"}]},
                                                  {"type": "text", "text": "and tomorrow?"}]}]})
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "tu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "tu_1", "content": "18 C"}, {"role": "user", "content": "and tomorrow?"}]
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                               "description": "Current weather in a city"}}]
    assert (chat["tool_choice"], chat["parallel_tool_calls"]) == ("required", False)
    assert (chat["max_tokens"], chat["stop"], chat["top_k"]) == (9, ["END"], 3)


@pytest.mark.slow
def test_forced_tool_use_streamed_and_a_tool_result_turn(real_server):
    claude, _ = clients(real_server)
    question = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    asked = dict(model="tiny", max_tokens=60, extra_body=GREEDY, tools=[WEATHER], messages=question)
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        message = claude.messages.create(tool_choice=choice, **asked)
        assert message.stop_reason == "tool_use"
        [call] = [b for b in message.content if b.type == "tool_use"]
        assert (call.name, call.input) == ("get_weather", {"city": "Paris"}) and call.id
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    shaped = claude.messages.create(model="tiny", max_tokens=100, extra_body=GREEDY, messages=question,
                                    output_config={"format": {"type": "json_schema", "schema": schema}})
    assert shaped.stop_reason == "end_turn", shaped.content[0].text
    assert set(json.loads(shaped.content[0].text)) == {"city"}  # constrained to the schema
    with claude.messages.stream(tool_choice={"type": "tool", "name": "get_weather"}, **asked) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"] and final.content[0].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    assert [e.type for e in events if e.type.startswith("content_block")][0] == "content_block_start"
    history = question + [{"role": "assistant", "content": [call.model_dump(exclude={"caller"}, exclude_none=True)]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                        "content": "18 C and sunny"}]}]
    answer = claude.messages.create(model="tiny", max_tokens=30, extra_body=GREEDY, messages=history)
    assert answer.content[0].type == "text" and answer.content[0].text


def test_message_batches_with_the_official_client(server):
    """Anthropic's Message Batches API on the batch API's store and runner: results equal to the
    interactive messages, an errored request in Anthropic's error shape, list, cancel of an
    ended batch, results, delete; another tenant sees none of it."""
    import time

    claude, _ = clients(server)
    asks = {f"ask-{i}": {"model": "tiny", "max_tokens": 4, "temperature": 0,
                         "messages": [{"role": "user", "content": f"t{5 + i} t9"}]} for i in range(3)}
    requests = [{"custom_id": k, "params": v} for k, v in asks.items()]
    requests.append({"custom_id": "bad", "params": {"model": "tiny", "messages": [{"role": "user", "content": "t5"}]}})
    batch = claude.messages.batches.create(requests=requests)
    assert batch.type == "message_batch" and batch.processing_status in ("in_progress", "ended")
    for _ in range(300):
        batch = claude.messages.batches.retrieve(batch.id)
        if batch.processing_status == "ended":
            break
        time.sleep(0.1)
    assert batch.processing_status == "ended" and batch.ended_at and batch.results_url
    counts = batch.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (0, 3, 1, 0, 0)
    results = {r.custom_id: r.result for r in claude.messages.batches.results(batch.id)}
    assert list(results) == ["ask-0", "ask-1", "ask-2", "bad"]
    for custom_id, params in asks.items():
        interactive = claude.messages.create(**{k: v for k, v in params.items() if k != "temperature"},
                                             extra_body={"temperature": 0})
        assert results[custom_id].type == "succeeded"
        assert results[custom_id].message.content[0].text == interactive.content[0].text
        assert results[custom_id].message.usage.output_tokens == interactive.usage.output_tokens
    bad = results["bad"]
    assert bad.type == "errored" and bad.error.error.type == "invalid_request_error"
    assert "max_tokens" in bad.error.error.message
    assert batch.id in [b.id for b in claude.messages.batches.list(limit=5).data]
    more = [claude.messages.batches.create(requests=requests[:1]).id for _ in range(2)]  # newest last
    assert [b.id for b in claude.messages.batches.list(limit=2).data] == more[::-1]
    assert [b.id for b in claude.messages.batches.list(limit=2, after_id=more[1]).data] == [more[0], batch.id]
    newer = claude.messages.batches.list(limit=1, before_id=batch.id)
    assert [b.id for b in newer.data] == [more[0]] and newer.has_more
    assert claude.messages.batches.cancel(batch.id).processing_status == "ended"  # nothing left to cancel

    other, _ = clients(server, "key-b")
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in other.messages.batches.list().data]
    assert claude.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.BadRequestError):  # custom ids are Anthropic's: letters, digits, _ and -
        claude.messages.batches.create(requests=[{"custom_id": "a b", "params": asks["ask-0"]}])


def test_a_cancelled_message_batch_ends_with_its_unrun_requests_canceled(server):
    import time

    claude, _ = clients(server)
    params = {"model": "tiny", "max_tokens": 64, "messages": [{"role": "user", "content": "t5 t6"}]}
    batch = claude.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params} for i in range(300)])
    with pytest.raises(anthropic.ConflictError):  # still processing: it must end first
        claude.messages.batches.delete(batch.id)
    assert claude.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
    for _ in range(300):
        batch = claude.messages.batches.retrieve(batch.id)
        if batch.processing_status == "ended":
            break
        time.sleep(0.1)
    counts = batch.request_counts
    assert batch.processing_status == "ended" and counts.canceled > 0 and batch.cancel_initiated_at
    assert counts.succeeded + counts.canceled == 300 and counts.processing == counts.errored == 0
    kinds = [r.result.type for r in claude.messages.batches.results(batch.id)]
    assert kinds.count("canceled") == counts.canceled and kinds.count("succeeded") == counts.succeeded
