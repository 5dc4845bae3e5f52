"""POST /v1/responses with the official client: the same answer as the chat completion it
amounts to (whole and streamed, as the Responses event sequence), refusals of what needs
stored state, then structured output and function calls on SmolLM2."""

from __future__ import annotations

import json
import time

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
    listed = client.responses.input_items.list(r.id)  # newest first, as OpenAI lists them
    assert [(i.role, i.content[0].type, i.content[0].text) for i in listed.data] == [
        ("user", "input_text", "t4 t5"), ("assistant", "output_text", "t9 t10"), ("user", "input_text", "t3"),
        ("developer", "input_text", "t7")]
    assert len({i.id for i in listed.data}) == 4 and not listed.has_more
    page = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["t7", "t3"] and page.has_more
    rest = client.responses.input_items.list(r.id, order="asc", after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["t9 t10", "t4 t5"]
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "t7"}, {"role": "user", "content": "t3"},
        {"role": "assistant", "content": "t9 t10"}, {"role": "user", "content": "t4 t5"}])
    assert r.output_text == chat.choices[0].message.content
    # extensions pass through as on the chat endpoint: min_p 1 samples the greedy answer
    sampled = client.responses.create(model="tiny", input=items, max_output_tokens=8, temperature=1,
                                      extra_body={"min_p": 1.0, "seed": 3})
    assert sampled.output_text == r.output_text


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": 5}, "previous_response_id"),
    ({"store": "yes"}, "store"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"truncation": "middle"}, "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "web_search_call", "status": "completed"}]}, "input"),
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


def test_stored_responses_continue_a_conversation_and_are_tenant_scoped(server):
    client = client_for(server)
    first = client.responses.create(model="tiny", instructions="t7", input="t3 t4", max_output_tokens=5,
                                    temperature=0)
    assert first.store is True and client.responses.retrieve(first.id).output_text == first.output_text
    # instructions are not carried over; the earlier input and answer are
    second = client.responses.create(model="tiny", previous_response_id=first.id, input="t5", max_output_tokens=5,
                                     temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=[
        {"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "t5"}])
    assert second.output_text == chat.choices[0].message.content and second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    # streamed: stored before response.completed, so it can be continued at once
    events = list(client.responses.create(model="tiny", previous_response_id=second.id, input="t6",
                                          max_output_tokens=5, temperature=0, stream=True))
    third = client.responses.create(model="tiny", previous_response_id=events[-1].response.id, input="t8",
                                    max_output_tokens=3, temperature=0)
    assert third.status == "incomplete" and client.responses.retrieve(events[-1].response.id).id == events[-1].response.id

    other = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0)
    for call in (lambda: other.responses.retrieve(first.id), lambda: other.responses.delete(first.id),
                 lambda: other.responses.create(model="tiny", previous_response_id=first.id, input="t5")):
        with pytest.raises(openai.NotFoundError):
            call()
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", previous_response_id=first.id, input="t5")
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # a continuation stands on its own

    unstored = client.responses.create(model="tiny", input="t3", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_response_store_keeps_rows_across_opens_and_prunes_old_ones(tmp_path):
    import sqlite3

    from loragate.gateway.response_store import DAY_S, ResponseStore

    with sqlite3.connect(tmp_path / "responses.db") as db:  # a store from before input items were kept
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL, "
                   "response TEXT NOT NULL, conversation TEXT NOT NULL)")
        db.execute("INSERT INTO responses VALUES ('resp_0', 'a', 1000, '{}', '[]')")
    store = ResponseStore(tmp_path, retention_days=2)
    assert store.tenant_bytes("a") == len('{}') + len('[]') + len('[]')  # sizes filled in for old rows
    assert store.get("resp_0").input_items == [] and store.delete("resp_0")
    store.put("a", {"id": "resp_1", "created_at": 1000}, [{"role": "user", "content": "x"}])
    store.close()
    store = ResponseStore(tmp_path, retention_days=2)
    stored = store.get("resp_1")
    assert (stored.tenant, stored.response["id"], stored.conversation) == ("a", "resp_1", [{"role": "user", "content": "x"}])
    assert store.prune(now=1000 + 2 * DAY_S - 1) == 0 and store.prune(now=1000 + 2 * DAY_S + 1) == 1
    assert store.get("resp_1") is None and not store.delete("resp_1")


def test_a_tenant_over_its_byte_cap_loses_its_oldest_responses_and_no_one_elses(tmp_path):
    from loragate.gateway.response_store import ResponseStore

    store = ResponseStore(tmp_path, max_bytes_per_tenant=3000)
    now = int(time.time())  # within the retention: a put also prunes expired rows

    def put(tenant, i, size=1000):
        response = {"id": f"resp_{tenant}{i}", "created_at": now + i}
        conversation = [{"role": "user", "content": "x" * (size - 80)}]
        store.put(tenant, response, conversation)

    put("b", 0)
    for i in range(6):
        put("a", i)
        assert store.tenant_bytes("a") <= 3000
    kept = [i for i in range(6) if store.get(f"resp_a{i}")]
    assert kept == [4, 5] or kept == [3, 4, 5]  # the newest ones, as many as fit
    assert store.get("resp_b0") is not None  # another tenant's row is not touched
    put("a", 6, size=5000)  # larger than the cap alone: kept, and the tenant's others make room
    assert [i for i in range(7) if store.get(f"resp_a{i}")] == [6]
    assert store.get("resp_b0") is not None
    store.close()
    store = ResponseStore(tmp_path)  # no cap (0): nothing is evicted
    for i in range(7, 10):
        put("a", i)
    assert all(store.get(f"resp_a{i}") for i in range(6, 10))


def test_the_response_store_cap_is_a_size_setting():
    from loragate.engine.errors import ModelConfigError
    from loragate.gateway.settings import GatewaySettings

    assert GatewaySettings(response_store_max_bytes_per_tenant="512MiB").response_store_max_bytes_per_tenant == 512 << 20
    assert GatewaySettings().response_store_max_bytes_per_tenant == 1 << 30
    with pytest.raises(ModelConfigError, match="response_store_max_bytes_per_tenant"):
        GatewaySettings(response_store_max_bytes_per_tenant="lots")


def test_truncation_auto_drops_the_oldest_items_to_fit_the_context(server):
    client = client_for(server)  # the tiny model's context: 2048 tokens
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(f"t{10 + (i * 7 + j) % 400}"
                                                                              for j in range(150))}
             for i in range(15)]  # 15 x 150 words: more than the context
    asked = {"model": "tiny", "instructions": "t7 t8", "input": turns, "max_output_tokens": 16, "temperature": 0}
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**asked)  # truncation 'disabled', the default: a 400
    r = client.responses.create(**asked, truncation="auto")
    assert r.status == "incomplete" and 2048 - 16 - 160 < r.usage.input_tokens <= 2048 - 16
    # the same answer as the chat completion of what was kept: the instructions and the newest turns
    kept = (r.usage.input_tokens - 20) // 150
    for n in (kept - 1, kept, kept + 1):
        messages = [{"role": "system", "content": "t7 t8"}] + turns[15 - n:]
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
        if chat.usage.prompt_tokens == r.usage.input_tokens:
            assert chat.choices[0].message.content == r.output_text
            break
    else:
        raise AssertionError("no suffix of the turns gives the truncated prompt's length")


def test_retention_zero_stores_nothing_and_says_so(tmp_path, monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from loragate.gateway.auth import KeyStore
    from loragate.gateway.errors import APIError
    from loragate.gateway.responses_api import _store_of, response_store_service
    from loragate.gateway.settings import GatewaySettings
    from loragate.gateway.state import ServerState

    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path))

    async def opened(days):
        state = ServerState(keys=KeyStore({"k": "t"}))
        app = SimpleNamespace(state=SimpleNamespace(settings=GatewaySettings(response_retention_days=days)))
        async with response_store_service(app, state):
            if days:
                return _store_of(state, None).retention_s
            with pytest.raises(APIError) as e:
                _store_of(state, "previous_response_id")
            return e.value.status, e.value.code

    assert asyncio.run(opened(0)) == (400, "responses_not_stored")
    assert not (tmp_path / "responses").exists()
    assert asyncio.run(opened(7)) == 7 * 24 * 3600 and (tmp_path / "responses" / "responses.db").exists()


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
    items = [{"role": "user", "content": question},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}]
    follow = client.responses.create(model="tiny", max_output_tokens=30, temperature=0, input=items)
    assert follow.output_text and follow.output[0].type == "message"
    # or the result alone, continuing the stored response that made the call: the same answer
    continued = client.responses.create(model="tiny", max_output_tokens=30, temperature=0, previous_response_id=r.id,
                                        input=items[2:])
    assert continued.output_text == follow.output_text
