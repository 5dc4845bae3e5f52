"""The server through the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging

import httpx
import openai
import pytest

from .conftest import wait_until_idle


def client(server, key="key-a"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_chat_streamed_text_joins_to_the_non_streamed_text(server):
    c = client(server)
    messages = [{"role": "user", "content": "t5 t6 t7 t8"}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert full.choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    tok = server.state.engine.tokenizer
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_text_completion_with_n_logprobs_and_stop(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="t5 t6 t7", max_tokens=6, temperature=0, n=2, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    assert len(r.choices[0].logprobs.token_logprobs) == r.usage.completion_tokens // 2
    assert all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)
    words = r.choices[0].text.split()
    if len(words) >= 2:
        stopped = c.completions.create(model="tiny", prompt="t5 t6 t7", max_tokens=6, temperature=0, stop=[words[1]])
        assert words[1] not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_stop_reason_names_the_stop_string_or_token_that_ended_a_choice(server):
    """vLLM's stop_reason beside finish_reason: the matched stop string, the stop token id, or
    null (end of text, or the length limit), streamed in the last chunk too."""
    c = client(server)
    forced = {"model": "tiny", "max_tokens": 4, "temperature": 0, "logit_bias": {"17": 100}}  # always t17
    messages = [{"role": "user", "content": "t5"}]
    by_string = c.chat.completions.create(messages=messages, stop=["t17"], **forced).choices[0]
    assert (by_string.finish_reason, by_string.stop_reason, by_string.message.content) == ("stop", "t17", "")
    by_token = c.completions.create(prompt="t5", extra_body={"stop_token_ids": [17]}, **forced).choices[0]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", 17)
    by_length = c.completions.create(prompt="t5", **forced).choices[0]
    assert (by_length.finish_reason, by_length.stop_reason) == ("length", None)
    last = [ch for ch in c.chat.completions.create(messages=messages, stop=["t17"], stream=True, **forced)][-1]
    assert (last.choices[0].finish_reason, last.choices[0].stop_reason) == ("stop", "t17")


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    a = c.completions.create(model="tiny", prompt="t9", max_tokens=8, temperature=1.0, seed=42)
    b = c.completions.create(model="tiny", prompt="t9", max_tokens=8, temperature=1.0, seed=42)
    assert a.choices[0].text == b.choices[0].text


def test_async_client_streams_completions(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
        stream = await c.completions.create(model="tiny", prompt="t11 t12", max_tokens=5, temperature=0, stream=True)
        parts = [ch.choices[0].text async for ch in stream if ch.choices]
        full = await c.completions.create(model="tiny", prompt="t11 t12", max_tokens=5, temperature=0)
        return "".join(parts), full.choices[0].text

    streamed, full = asyncio.run(main())
    assert streamed == full


def test_penalties_bias_and_min_tokens_reach_the_sampler(server):
    c = client(server)
    messages = [{"role": "user", "content": "t5 t6 t7 t8"}]
    forced = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                       logit_bias={"17": 100})
    assert forced.choices[0].message.content.split() == ["t17"] * 5
    plain = c.completions.create(model="tiny", prompt="t9 t9 t9", max_tokens=16, temperature=0,
                                 extra_body={"min_tokens": 16})
    penalized = c.completions.create(model="tiny", prompt="t9 t9 t9", max_tokens=16, temperature=0,
                                     frequency_penalty=2, presence_penalty=2, extra_body={"min_tokens": 16})
    words = penalized.choices[0].text.split()
    assert len(words) == 16 and plain.choices[0].text != penalized.choices[0].text
    assert len(set(words)) == 16  # a penalty of 4 per repeat is far above this model's logit spread


def test_echo_scores_the_prompt_like_hf(server, tiny_llama):
    """What eval harnesses send: echo + logprobs, with max_tokens 1 or 0 (the prompt alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    c = client(server)
    prompt = "t5 t6 t7 t8 t9 t10"
    ids = server.state.engine.tokenizer.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], dim=-1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()

    one = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = one.choices[0].logprobs
    assert one.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens[:len(ids)]).replace("t", " t").split() == prompt.split()

    zero = c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert zero.choices[0].text == prompt and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    streamed = list(c.completions.create(model="tiny", prompt=[prompt, "t3 t4"], max_tokens=4, temperature=0,
                                         echo=True, logprobs=1, stream=True))
    whole = c.completions.create(model="tiny", prompt=[prompt, "t3 t4"], max_tokens=4, temperature=0, echo=True,
                                 logprobs=1)
    for i in range(2):
        pieces = [ch.choices[0] for ch in streamed if ch.choices[0].index == i]
        text = "".join(p.text for p in pieces)
        assert text == whole.choices[i].text and text.startswith([prompt, "t3 t4"][i])
        assert sum((p.logprobs.tokens for p in pieces), []) == whole.choices[i].logprobs.tokens
        got = sum((p.logprobs.token_logprobs for p in pieces), [])
        want = whole.choices[i].logprobs.token_logprobs
        assert got[0] is None and want[0] is None and got[1:] == pytest.approx(want[1:], abs=1e-4)
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenizer_routes_in_vllms_shapes(server):
    """What lm-evaluation-harness probes before tokenizing remotely."""
    h = server.headers()
    tok = server.state.engine.tokenizer
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == tok.chat_template
    r = httpx.post(server.url + "/tokenize", headers=h, json={"prompt": "t5 t6 t7", "add_special_tokens": False}).json()
    assert r["tokens"] == [5, 6, 7] and r["count"] == 3 and r["max_model_len"] > 0
    chat = httpx.post(server.url + "/tokenize", headers=h, json={"messages": [{"role": "user", "content": "t9"}]}).json()
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "t9"}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    assert httpx.post(server.url + "/detokenize", headers=h, json={"tokens": [5, 6, 7]}).json() == {"prompt": "t5 t6 t7"}
    for path, body in (("/detokenize", {"tokens": [99999]}), ("/detokenize", {"tokens": "t5"}),
                       ("/tokenize", {"prompt": 5}), ("/tokenize", {"prompt": "x", "add_special_tokens": "no"})):
        r = httpx.post(server.url + path, headers=h, json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body)
    assert httpx.post(server.url + "/tokenize", json={"prompt": "t5"}).status_code == 401


def test_a_chat_template_refusing_the_messages_is_a_400(server):
    """Templates raise on what they cannot render (Gemma 2: a system message; Mistral: roles
    that do not alternate): a 400 with their reason, wherever a chat is rendered. A template
    that does not parse is the server's fault: 500."""
    tok, h = server.state.engine.tokenizer, server.headers()
    original = tok.chat_template
    messages = [{"role": "system", "content": "t5"}, {"role": "user", "content": "t9"}]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 2}
    try:
        tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                             "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")
        for path, body in (("/v1/chat/completions", chat), ("/tokenize", {"messages": messages})):
            r = httpx.post(server.url + path, headers=h, json=body)
            assert r.status_code == 400, r.text
            assert "System role not supported" in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
        assert httpx.post(server.url + "/v1/chat/completions", headers=h,
                          json=dict(chat, messages=messages[1:])).status_code == 200
        tok.chat_template = "{% for m in messages %}"
        assert httpx.post(server.url + "/v1/chat/completions", headers=h, json=chat).status_code == 500
    finally:
        tok.chat_template = original


def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    prompt = " ".join(f"t{i}" for i in range(100, 140))  # 40 tokens: two full 16-token blocks
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0).usage
    again = client.completions.create(model="tiny", prompt=prompt + " t7", max_tokens=2, temperature=0).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert again.prompt_tokens_details.cached_tokens == 32 and again.prompt_tokens == first.prompt_tokens + 1
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
    # Another tenant's identical prompt finds nothing: a hit would tell it what tenant-a sent.
    other = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0)
    theirs = other.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0).usage
    assert theirs.prompt_tokens_details.cached_tokens == 0


def test_a_predicted_output_gives_the_same_answer_and_counts_its_tokens(server):
    """OpenAI's predicted outputs: the prediction's tokens are verified as proposals, so the
    answer is the one without it; usage says how many of them the answer took."""
    c = client(server)
    messages = [{"role": "user", "content": "t5 t6 t7 t8"}]
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no prediction, no prediction counts
    for content in (text, [{"type": "text", "text": text[:len(text) // 2]}, {"type": "text", "text": text[len(text) // 2:]}]):
        predicted = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                              prediction={"type": "content", "content": content})
        assert predicted.choices[0].message.content == text
        details = predicted.usage.completion_tokens_details
        assert details.accepted_prediction_tokens >= 20 and details.rejected_prediction_tokens <= 4
    words = text.split()
    wrong = " ".join(words[:6] + ["t9"] * 6)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            prediction={"type": "content", "content": wrong}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    details = chunks[-1].usage.completion_tokens_details
    assert 1 <= details.accepted_prediction_tokens <= 6 and details.rejected_prediction_tokens >= 6
    metrics = httpx.get(server.url + "/metrics").text
    accepted = float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith("loragate_predicted_tokens_accepted ")))
    assert accepted >= 2 * 20 + details.accepted_prediction_tokens


def test_min_p_reaches_the_sampler(server):
    """min_p 1 keeps only the most likely token: a sampled completion is then the greedy one."""
    body = {"model": "tiny", "prompt": "t3 t4 t5", "max_tokens": 12, "ignore_eos": True}
    h = server.headers()
    greedy = httpx.post(server.url + "/v1/completions", headers=h, json=body | {"temperature": 0}).json()
    sampled = [httpx.post(server.url + "/v1/completions", headers=h,
                          json=body | {"temperature": 1, "seed": s, "min_p": p}).json() for s, p in ((1, 1.0), (1, 0.0))]
    assert sampled[0]["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert sampled[1]["choices"][0]["text"] != greedy["choices"][0]["text"]  # without min_p it samples


def test_models_list_shows_the_base_model_and_one_can_be_retrieved(server):
    ids = [m.id for m in client(server).models.list().data]
    assert "tiny" in ids
    assert client(server).models.retrieve("tiny").max_model_len == server.state.engine.engine.max_model_len > 0
    assert client(server).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client(server).models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 100}, "n"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "min_p": 1.5}, "min_p"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": "tiny", "prompt": "x", "suffix": "end"}, "suffix"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, "seed"),
    ({"model": "tiny", "prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"model": "tiny", "prompt": "x", "return_token_ids": "yes"}, "return_token_ids"),
    ({"model": "tiny", "prompt": "x", "cache_salt": 5}, "cache_salt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 2**63}, "max_tokens"),  # past the context: not a run to its end
    ({"model": "tiny", "prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": "tiny", "prompt": "x", "tool_choice": "required"}, "tool_choice"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
     "response_format"),
    ({"model": "tiny", "prompt": "x", "prediction": {"type": "content"}}, "prediction"),
    ({"model": "tiny", "prompt": "x", "prediction": {"type": "file", "content": "t5"}}, "prediction"),
    ({"model": "tiny", "prompt": "x", "prediction": {"type": "content", "content": [{"type": "image"}]}}, "prediction"),
    # the tiny model's word-level tokenizer has no byte decoder for the grammar engine
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_requests_are_400_in_openai_shape(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, param", [
    ({"chat_template": "{{ messages }}"}, "chat_template"),  # vLLM too refuses these by default
    ({"documents": [{"title": "a", "text": "b"}]}, "documents"),
    ({"add_special_tokens": True}, "add_special_tokens"),
    ({"web_search_options": {}}, "web_search_options"),
])
def test_chat_options_that_would_be_ignored_are_400(server, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "t6"}], "max_tokens": 1, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_completions_add_special_tokens_as_vllm(tiny_llama, tmp_path, monkeypatch):
    """A tokenizer that writes BOS before a text: add_special_tokens false leaves it out."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    from .conftest import RunningServer

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(model)
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(model, None)
    try:
        def prompt_tokens(**extra):
            body = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 1, **extra}
            r = httpx.post(s.url + "/v1/completions", json=body, headers=s.headers())
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]
        assert prompt_tokens() == prompt_tokens(add_special_tokens=True) == 3
        assert prompt_tokens(add_special_tokens=False) == 2
    finally:
        s.stop()


def test_unknown_model_is_404_and_missing_key_is_401(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=server.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=server.headers())
    assert r.status_code == 400


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                                  "/tokenize", "/v1/batches"])
def test_json_nested_past_the_parsers_limit_is_400(server, path, caplog):
    uvicorn_log = logging.getLogger("uvicorn.error")  # where an exception Starlette re-raises is logged
    uvicorn_log.addHandler(caplog.handler)
    try:
        r = httpx.post(server.url + path, content=b'{"a":' * 3000, headers=server.headers())
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert r.status_code == 400, r.text
    assert "nests too deeply" in r.json()["error"]["message"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]  # a bad request, no crash


def test_json_deep_enough_to_walk_past_the_limit_is_400(server):
    deep = "x"
    for _ in range(900):  # parses (the decoder allows ~1000 levels), but checking the tool's schema recurses deeper
        deep = [deep]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"enum": [deep]}}}}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "tools": [tool],
            "tool_choice": "required"}
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body), headers=server.headers())
    assert r.status_code == 400, r.text
    assert "nests too deeply" in r.json()["error"]["message"]


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    r = httpx.get(server.url + "/v1/nope", headers=server.headers())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.delete(server.url + "/v1/completions", headers=server.headers())
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in r.headers["allow"]


def test_aborted_streams_free_every_kv_block(server):
    body = {"model": "tiny", "prompt": "t3 t4", "max_tokens": 400, "temperature": 0, "stream": True}

    async def one():
        async with httpx.AsyncClient(timeout=30) as h:
            async with h.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers()) as r:
                assert r.status_code == 200
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        if n >= 3:
                            return  # hang up mid-stream

    async def main():
        await asyncio.gather(*(one() for _ in range(20)))

    asyncio.run(main())
    engine = server.state.engine.engine
    wait_until_idle(engine)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_health_and_readiness(server, monkeypatch):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # vLLM's path
    assert httpx.get(server.url + "/version").json() == {"version": importlib.metadata.version("loragate")}  # vLLM's
    assert httpx.get(server.url + "/readyz").status_code == 200
    monkeypatch.setattr(server.state.engine, "error", RuntimeError("boom"))  # the engine loop died
    for path in ("/healthz", "/health"):  # liveness fails, so the orchestrator restarts the server
        r = httpx.get(server.url + path)
        assert r.status_code == 503 and r.json() == {"status": "engine_dead", "error": "boom"}
    assert httpx.get(server.url + "/readyz").status_code == 503


def test_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "t13"}], "max_tokens": 3, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers())
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [l for l in r.text.split("\n") if l]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_a_refused_prompt_in_a_batch_queues_nothing(server):
    engine = server.state.engine.engine
    too_long = " ".join(f"t{3 + i % 500}" for i in range(3000))
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=30,
                   json={"model": "tiny", "prompt": ["t5 t6", too_long], "max_tokens": 2000, "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    import time

    for _ in range(100):
        if not engine.has_unfinished:
            break
        time.sleep(0.02)
    assert not engine.has_unfinished and engine.kv.num_free_blocks == engine.kv.num_blocks


def test_return_token_ids_gives_the_prompts_and_each_choices_tokens(server):
    """vLLM's return_token_ids, which RL rollouts train on: chat's prompt ids at the top (in a
    stream's first chunk), completions' per choice; each choice's token_ids, streamed as deltas."""
    c = client(server)
    tok = server.state.engine.tokenizer
    messages = [{"role": "user", "content": "t5 t6"}]
    ids = {"return_token_ids": True}
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, n=2,
                                     extra_body=ids).model_dump()
    assert chat["prompt_token_ids"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)
    for choice in chat["choices"]:
        assert tok.decode(choice["token_ids"]).strip() == choice["message"]["content"]
    assert sum(len(ch["token_ids"]) for ch in chat["choices"]) == chat["usage"]["completion_tokens"]
    chunks = [ch.model_dump() for ch in c.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                                                   temperature=0, stream=True, extra_body=ids)]
    assert chunks[0]["prompt_token_ids"] == chat["prompt_token_ids"]
    assert all(ch.get("prompt_token_ids") is None for ch in chunks[1:])
    assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == chat["choices"][0]["token_ids"]
    prompts = ["t5 t6 t7", "t9"]
    plain = c.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, extra_body=ids).model_dump()
    assert [ch["prompt_token_ids"] for ch in plain["choices"]] == [tok.encode(p) for p in prompts]
    streamed = [ch.model_dump() for ch in c.completions.create(model="tiny", prompt=prompts, max_tokens=4,
                                                               temperature=0, stream=True, extra_body=ids)]
    for i, choice in enumerate(plain["choices"]):
        mine = [ch["choices"][0] for ch in streamed if ch["choices"][0]["index"] == i]
        assert [t for piece in mine for t in piece["token_ids"]] == choice["token_ids"]
        assert mine[0]["prompt_token_ids"] == choice["prompt_token_ids"] and mine[1].get("prompt_token_ids") is None
    assert "token_ids" not in c.completions.create(model="tiny", prompt="t5", max_tokens=2).model_dump()["choices"][0]


def test_tokens_as_ids_in_logprobs_and_a_cache_salt_keeps_prefix_hits_apart(server):
    """vLLM's return_tokens_as_token_ids names logprobs' tokens "token_id:<id>"; its cache_salt
    lets only requests with the same salt share prefix-cache entries."""
    c = client(server)
    as_ids = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5 t6"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2, extra_body=as_ids).model_dump()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in chat["choices"][0]["token_ids"]]
    assert all(alt["token"].startswith("token_id:") for e in content for alt in e["top_logprobs"])
    plain = c.completions.create(model="tiny", prompt="t5 t6", max_tokens=3, temperature=0, logprobs=1, echo=True,
                                 extra_body=as_ids).model_dump()["choices"][0]
    tok = server.state.engine.tokenizer
    prompt = tok.encode("t5 t6")
    assert plain["logprobs"]["tokens"] == [f"token_id:{t}" for t in prompt + plain["token_ids"]]
    assert plain["logprobs"]["text_offset"][1] == len(tok.decode(prompt[:1]))  # offsets stay the text's

    long_prompt = " ".join(f"t{i}" for i in range(441, 501))  # no other test of this module sends it

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        r = c.completions.create(model="tiny", prompt=long_prompt, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("alpha") == 0 and cached("alpha") > 0  # the same salt shares
    assert cached("beta") == 0 and cached(None) == 0  # another salt, or none, does not


def test_vllms_prompt_logprobs_score_the_prompt_with_ranks(server):
    """vLLM's prompt_logprobs: null, then per prompt token its logprob and rank and the top k
    (ranks 1..k); the values are echo's, per choice on completions, at the top on chat, in a
    stream's first chunk; echo keeps its own top-k beside a larger prompt_logprobs."""
    c = client(server)
    tok = server.state.engine.tokenizer
    prompt = "t5 t6 t7 t8"
    ids = tok.encode(prompt)
    echoed = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 3}).model_dump()["choices"][0]
    scores = echoed["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    for position, token, want in zip(scores[1:], ids[1:], echoed["logprobs"]["token_logprobs"][1:len(ids)]):
        mine = position[str(token)]
        assert mine["logprob"] == pytest.approx(want, abs=1e-6) and mine["decoded_token"] == tok.decode([token])
        ranked = sorted(position.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked if e is not mine] in ([1, 2, 3], [1, 2]) and mine["rank"] >= 1
        assert all(e["logprob"] <= ranked[0]["logprob"] for e in ranked)
        better = [e for e in position.values() if e["logprob"] > mine["logprob"] + 1e-6]
        assert mine["rank"] > len(better) or mine["rank"] <= 3  # never ranked above likelier tokens
    assert all(len(top) == 1 for top in echoed["logprobs"]["top_logprobs"][1:len(ids)])  # echo's own k
    messages = [{"role": "user", "content": prompt}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 0})
    chat = chat.model_dump()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(p) == 1 for p in chat["prompt_logprobs"][1:])  # k 0: the prompt's own tokens alone
    first = next(iter(c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, stream=True,
                                                extra_body={"prompt_logprobs": 0}))).model_dump()
    assert first["prompt_logprobs"] == chat["prompt_logprobs"]
