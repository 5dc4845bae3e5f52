"""vLLM's request extensions over HTTP with the official client on the tiny model: an assistant
prefill (continue_final_message), truncate_prompt_tokens (completions, chat, embeddings),
allowed_token_ids, bad_words, include_stop_str_in_output and skip_special_tokens. Each
answer is checked against the same model asked without the extension, so each can fail."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from .conftest import _module_server

PROMPT = [1] + list(range(40, 70))  # 31 token ids


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)


def ids_of(text: str) -> list[int]:
    """The tiny vocabulary's words "t<id>" back to ids."""
    return [int(w[1:]) for w in text.split() if w.startswith("t")]


def complete(server, prompt, max_tokens=8, **extra):
    return client(server).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body=extra)


@pytest.fixture(scope="module")
def turn_server(tiny_llama, tmp_path_factory, monkeypatch_module):
    """The tiny model with a chat template that ends every message with t6, as real ones end turns."""
    path = tmp_path_factory.mktemp("tiny-turns")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for m in messages %}{{ 't3' if m['role'] == 'user' else 't4' }} {{ m['content'] }} t6 "
                         "{% endfor %}{% if add_generation_prompt %}t5{% endif %}")
    tok.save_pretrained(path)
    yield from _module_server(path, tmp_path_factory, monkeypatch_module)


def test_continue_final_message_goes_on_from_the_assistants_prefill(turn_server):
    server = turn_server
    tok = server.state.engine.tokenizer
    messages = [{"role": "user", "content": "t10 t11"}, {"role": "assistant", "content": "t12 t13"}]
    got = client(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    ids = tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=False, tokenize=True,
                                  return_dict=False)
    assert ids[-3:] == [4, 12, 13]  # the prompt ends inside the assistant's message, not after its t6
    want = complete(server, ids, max_tokens=6)
    assert got.usage.prompt_tokens == len(ids) and got.choices[0].message.content == want.choices[0].text.strip()
    for extra, param in (({"continue_final_message": True}, "continue_final_message"),
                         ({"continue_final_message": True, "add_generation_prompt": False,
                           "messages": [{"role": "user", "content": "t1"}]}, "continue_final_message")):
        body = {"model": "tiny", "messages": messages, **extra}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers())
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_truncate_prompt_tokens_keeps_the_prompts_end(server):
    got = complete(server, PROMPT, truncate_prompt_tokens=10)
    assert got.usage.prompt_tokens == 10 and got.choices[0].text == complete(server, PROMPT[-10:]).choices[0].text
    assert complete(server, PROMPT, truncate_prompt_tokens=-1).usage.prompt_tokens == len(PROMPT)  # all fit
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t9 " * 40}],
                                                  max_tokens=2, extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    e = client(server).embeddings
    cut = e.create(model="tiny", input=[PROMPT], extra_body={"truncate_prompt_tokens": 7})
    assert cut.usage.prompt_tokens == 7 and cut.data[0].embedding == e.create(model="tiny", input=[PROMPT[-7:]]).data[0].embedding
    for value in (0, -2, "5"):
        r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                       json={"model": "tiny", "prompt": "t5", "truncate_prompt_tokens": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_allowed_tokens_and_bad_words_change_the_answer_as_asked(server):
    free = ids_of(complete(server, PROMPT, ignore_eos=True).choices[0].text)
    allowed = [50, 51, 52, free[3]]
    only = ids_of(complete(server, PROMPT, ignore_eos=True, allowed_token_ids=allowed).choices[0].text)
    assert len(only) == 8 and set(only) <= set(allowed) and only != free
    banned = free[1]
    without = ids_of(complete(server, PROMPT, ignore_eos=True, bad_words=[f"t{banned}"]).choices[0].text)
    assert without[:1] == free[:1] and banned not in without
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "t5", "allowed_token_ids": [9999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids"


def test_stop_strings_kept_and_special_tokens_shown_on_request(server):
    free = complete(server, PROMPT, ignore_eos=True).choices[0].text.split()
    stop = free[2]
    kept = complete(server, PROMPT, ignore_eos=True, stop=[stop], include_stop_str_in_output=True).choices[0]
    cut = complete(server, PROMPT, ignore_eos=True, stop=[stop]).choices[0]
    assert kept.text.split() == free[:3] and cut.text.split() == free[:2]
    eos = {"allowed_token_ids": [2], "ignore_eos": True}  # only </s>, the tokenizer's special end token
    assert complete(server, PROMPT, **eos).choices[0].text == ""
    assert complete(server, PROMPT, **eos, skip_special_tokens=False).choices[0].text.split() == ["</s>"] * 8


def test_continuous_usage_stats_count_on_every_chunk(server):
    stream = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "t5 t6"}], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    final = chunks[-1].usage
    running = [c.usage for c in chunks[:-1]]
    assert all(u.prompt_tokens == final.prompt_tokens for u in running)
    counts = [u.completion_tokens for u in running]
    assert counts == sorted(counts) and counts[-1] == final.completion_tokens == 12
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in running)
    plain = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}],
                                                   max_tokens=3, stream=True)
    assert all(c.usage is None for c in plain)


@pytest.mark.parametrize("field, value", [("bad_words", "t5"), ("allowed_token_ids", []),
                                          ("include_stop_str_in_output", "yes"),
                                          ("stream_options", {"include_usage": True})])  # without stream
def test_bad_extension_values_are_400s(server, field, value):
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "t5", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.fixture
def priorities(server, monkeypatch):
    """The scheduling priority of each request the engine is given, in order."""
    seen = []
    engine = server.state.engine
    add = engine.add_requests

    async def recording(prompts, *args, **kwargs):
        seen.extend(params.priority for _, params in prompts)
        return await add(prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "add_requests", recording)
    monkeypatch.setattr(server.state, "tenant_priorities", {"tenant-a": 2})
    return seen


def test_a_request_can_be_less_urgent_than_its_tenant_never_more(server, priorities):
    for key, asked in (("key-a", -5), ("key-a", 7), ("key-a", None), ("key-b", -3), ("key-b", 4)):
        body = {"model": "tiny", "prompt": "t5", "max_tokens": 1, **({"priority": asked} if asked is not None else {})}
        r = httpx.post(server.url + "/v1/completions", headers=server.headers(key), json=body)
        assert r.status_code == 200, r.text
    assert priorities == [2, 7, 2, 0, 4]  # tenant-a's floor is 2; tenant-b has none (0)
    from .test_batches import line, run_batch

    batch = run_batch(server, [line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 1, "priority": -1})],
                      key="key-b")
    assert batch["request_counts"]["completed"] == 1 and priorities[-1] == 1  # a batch line: behind interactive ones
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "t5", "priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_tenant_priorities_setting():
    from loragate.engine.errors import ModelConfigError
    from loragate.gateway.settings import GatewaySettings

    assert GatewaySettings(tenant_priorities="gold=-1, free=2").tenant_priority_map() == {"gold": -1, "free": 2}
    for bad in ("gold", "gold=x", "=1"):
        with pytest.raises(ModelConfigError, match="tenant_priorities"):
            GatewaySettings(tenant_priorities=bad)


def test_the_flex_service_tier_runs_less_urgently(server, priorities):
    c = client(server)
    for tier, want in (("flex", 2), ("priority", 2), ("auto", 2)):  # tenant-a's level is 2: flex (1) is above it
        got = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=1,
                                        service_tier=tier)
        assert got.service_tier == ("flex" if tier == "flex" else "default") and priorities[-1] == want
    got = httpx.post(server.url + "/v1/completions", headers=server.headers("key-b"),
                     json={"model": "tiny", "prompt": "t5", "max_tokens": 1, "service_tier": "flex"})
    assert got.json()["service_tier"] == "flex" and priorities[-1] == 1  # tenant-b: 0, flex makes it 1
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "t5", "service_tier": "scale"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


def test_served_model_name_aliases(tiny_llama, tmp_path, monkeypatch):
    """vLLM's several --served-model-name: every name runs the base model and is listed; an
    answer names the model it was asked for."""
    from .conftest import RunningServer

    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, served="tiny,gpt-4o-mini")
    try:
        listed = httpx.get(s.url + "/v1/models", headers=s.headers()).json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "gpt-4o-mini"]
        body = {"prompt": "t5 t6", "max_tokens": 5, "temperature": 0}
        answers = [httpx.post(s.url + "/v1/completions", json={"model": m, **body}, headers=s.headers()).json()
                   for m in ("tiny", "gpt-4o-mini")]
        assert [a["model"] for a in answers] == ["tiny", "gpt-4o-mini"]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        assert httpx.get(s.url + "/v1/models/gpt-4o-mini", headers=s.headers()).status_code == 200
    finally:
        s.stop()
    from loragate.engine.errors import ModelConfigError
    from loragate.gateway.settings import GatewaySettings

    for bad in ("tiny,,x", "tiny,tiny", "a:b", "two words"):
        with pytest.raises(ModelConfigError, match="served_model_name"):
            GatewaySettings(served_model_name=bad)
