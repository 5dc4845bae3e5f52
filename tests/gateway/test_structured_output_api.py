"""response_format over HTTP with the official client, on the real SmolLM2: JSON schema
(streamed and not), JSON object mode, and refusals of formats that cannot be served."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer", "minimum": 0},
                   "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
    "required": ["city", "population", "landmarks"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture
def client(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="key-a", max_retries=0)


def test_json_schema_answer_streamed_and_not(client, real_server):
    def jumped() -> float:
        text = httpx.get(real_server.url + "/metrics").text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith("loragate_jump_forward_tokens ")))

    before = jumped()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100, temperature=0,
                                          response_format=FORMAT)
    assert jumped() > before  # the schema's keys were forced
    answer = json.loads(full.choices[0].message.content)
    jsonschema.validate(answer, SCHEMA)
    assert full.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100, temperature=0,
                                            response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_json_object_mode_on_both_endpoints(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80, temperature=0.8, seed=1,
                                          n=2, response_format={"type": "json_object"})
    for choice in chat.choices:
        assert isinstance(json.loads(choice.message.content), dict)
    text = client.completions.create(model="tiny", prompt="A JSON record of a book:", max_tokens=80, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(text.choices[0].text), dict)


def test_unusable_schemas_are_400(client):
    for schema in ({"type": "integer", "minimum": "five"}, {"type": "object", "properties": {"a": {"type": "nope"}}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert e.value.body["param"] == "response_format"


def test_vllm_structured_outputs_choice_regex_and_grammar(client):
    def ask(spec, content="Is the sky blue? Answer briefly.", temperature=0.0, seed=None):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=40, temperature=temperature, seed=seed,
                                              extra_body={"structured_outputs": spec}).choices[0]

    choices = ["yes", "no", "it depends on the \"weather\""]
    for seed in range(3):  # sampled too: always one of them, whole
        answer = ask({"choice": choices}, temperature=1.0, seed=seed)
        assert answer.message.content in choices and answer.finish_reason == "stop"
    date = ask({"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}, "When did the Apollo 11 mission land on the Moon?")
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.message.content)
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    assert re.fullmatch(r"The answer is [0-9]+\.", ask({"grammar": lark}, "What is 6 times 7?").message.content)
    assert json.loads(ask({"json": json.dumps(SCHEMA)}, "Tell me about Rome.").message.content)["city"]


def test_vllms_earlier_guided_fields_constrain_the_same_way(client):
    def ask(extra, content="Is the sky blue? Answer briefly."):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=40, temperature=0, extra_body=extra).choices[0].message.content

    assert ask({"guided_choice": ["yes", "no"], "guided_decoding_backend": "xgrammar"}) in ("yes", "no")
    assert re.fullmatch(r"[0-9]{4}", ask({"guided_regex": r"[0-9]{4}"}, "In which year did Apollo 11 land?"))
    jsonschema.validate(json.loads(ask({"guided_json": SCHEMA}, "Tell me about Rome.")), SCHEMA)
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    assert ask({"guided_grammar": lark}, "What is 6 times 7?") == ask({"structured_outputs": {"grammar": lark}},
                                                                       "What is 6 times 7?")


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"choice": ["a"], "regex": "b"}},
    {"structured_outputs": {"choice": []}},
    {"structured_outputs": {"regex": "("}},
    {"structured_outputs": {"grammar": "start: foo ("}},
    {"structured_outputs": {"json": "{not json"}},
    {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
    {"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"},
    {"guided_choice": ["a"], "guided_regex": "b"},
    {"guided_choice": []},
    {"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?"},
])
def test_bad_structured_outputs_are_400(client, extra):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, extra_body=extra)
