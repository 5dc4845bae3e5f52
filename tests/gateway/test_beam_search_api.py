"""vLLM's use_beam_search on /v1/completions and /v1/chat/completions: n beams give n choices,
the hypotheses transformers' beam search finds (tests/engine/test_beam_search.py checks the
search itself)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loragate.engine import BeamSearchParams

from ..engine.test_beam_search import hf_beams
from .conftest import wait_until_idle
from .test_adapters_api import files_of, upload


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def post(server, path: str, body: dict, key="key-a", **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers(key), timeout=kw.pop("timeout", 60), **kw)


def test_completions_choices_are_the_hypotheses_best_first(server, hf):
    prompts = ["t5 t6 t7", "t9 t10 t11 t12 t13"]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 10, "n": 3, "use_beam_search": True,
            "length_penalty": 0.5, "return_token_ids": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    engine = server.state.engine.engine
    eos = sorted(engine.eos_token_ids)
    for pi, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt)
        beams, _ = hf_beams(hf, ids, BeamSearchParams(beam_width=3, max_tokens=10, length_penalty=0.5), eos)
        choices = answer["choices"][3 * pi:3 * pi + 3]
        assert [c["index"] for c in choices] == [3 * pi, 3 * pi + 1, 3 * pi + 2]
        assert [c["token_ids"] for c in choices] == beams and all(c["prompt_token_ids"] == ids for c in choices)
        for c in choices:
            stopped = c["token_ids"][-1] in eos
            assert c["finish_reason"] == ("stop" if stopped else "length")
            assert c["text"] == engine.tokenizer.decode(c["token_ids"][:-1] if stopped else c["token_ids"],
                                                        skip_special_tokens=True)
    usage = answer["usage"]
    assert usage["completion_tokens"] == sum(len(c["token_ids"]) for c in answer["choices"])
    assert usage["prompt_tokens"] == sum(len(engine.tokenizer.encode(p)) for p in prompts)
    # streamed: each choice arrives whole, the same
    streamed = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0).completions.create(
        model="tiny", prompt=prompts, max_tokens=10, n=3, stream=True, stream_options={"include_usage": True},
        extra_body={"use_beam_search": True, "length_penalty": 0.5})
    texts, reasons, usage_seen = {}, {}, None
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
        usage_seen = chunk.usage or usage_seen
    assert [texts[i] for i in range(6)] == [c["text"] for c in answer["choices"]]
    assert [reasons[i] for i in range(6)] == [c["finish_reason"] for c in answer["choices"]]
    assert usage_seen.completion_tokens == usage["completion_tokens"]


def test_chat_beams_through_the_openai_client_end_on_stop_tokens(server, hf):
    tok = server.state.engine.tokenizer
    messages = [{"role": "user", "content": "t5 t6 t7 t8"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    greedy = hf.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, len(ids):]
    stop = [greedy[1].item(), greedy[3].item()]  # beams meet these early
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, n=4, temperature=0,
                                  extra_body={"use_beam_search": True, "early_stopping": True, "stop_token_ids": stop})
    eos = sorted(server.state.engine.engine.eos_token_ids)
    params = BeamSearchParams(beam_width=4, max_tokens=12, early_stopping=True, stop_token_ids=stop)
    beams, _ = hf_beams(hf, ids, params, eos + stop)
    assert [ch.message.content for ch in r.choices] == [
        tok.decode(b[:-1] if b[-1] in eos + stop else b, skip_special_tokens=True) for b in beams]
    assert "stop" in [ch.finish_reason for ch in r.choices]
    assert [ch.model_extra["stop_reason"] for ch in r.choices] == [b[-1] if b[-1] in stop else None for b in beams]


def test_a_tenants_adapter_searches_as_peft_does(server, tiny_llama, tmp_path, save_lora):
    path = save_lora(tiny_llama, tmp_path / "beams", 0.3, seed=4, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "down_proj"])
    assert upload(server, "beams", files_of(path)).status_code == 201
    body = {"model": "beams", "prompt": "t5 t6 t7", "max_tokens": 8, "n": 2, "use_beam_search": True,
            "return_token_ids": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    engine = server.state.engine.engine
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), path)
    beams, _ = hf_beams(peft, engine.tokenizer.encode("t5 t6 t7"), BeamSearchParams(beam_width=2, max_tokens=8),
                        sorted(engine.eos_token_ids))
    assert [c["token_ids"] for c in r.json()["choices"]] == beams
    assert post(server, "/v1/completions", body, key="key-b").status_code == 404  # another tenant's


def test_a_client_that_hangs_up_stops_the_search(server):
    body = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 1500, "n": 4, "use_beam_search": True,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=1.0)
    engine = server.state.engine.engine
    wait_until_idle(engine)
    for _ in range(20):  # and stays idle: a search left running is idle only between its steps
        time.sleep(0.025)
        assert not engine.has_unfinished
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("extra,param", [
    ({"use_beam_search": "yes"}, "use_beam_search"),
    ({"length_penalty": 0.5}, "length_penalty"),  # without use_beam_search it would do nothing
    ({"use_beam_search": True, "early_stopping": "soon"}, "early_stopping"),
    ({"use_beam_search": True, "length_penalty": "long"}, "length_penalty"),
    ({"use_beam_search": True, "stop": ["t9"]}, "stop"),
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "top_p": 0.9}, "top_p"),
    ({"use_beam_search": True, "presence_penalty": 0.5}, "presence_penalty"),
    ({"use_beam_search": True, "min_tokens": 2}, "min_tokens"),
    ({"use_beam_search": True, "prompt_logprobs": 1}, "use_beam_search"),
    ({"use_beam_search": True, "echo": True}, "use_beam_search"),
    ({"use_beam_search": True, "max_tokens": 2048}, "max_tokens"),  # past the context
    ({"use_beam_search": True, "n": 17}, "n"),
])
def test_what_beam_search_cannot_honour_is_a_400(server, extra, param):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "t5 t6", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not server.state.engine.engine.has_unfinished


def test_beams_carry_their_tokens_logprobs(server):
    body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 6, "n": 2, "use_beam_search": True, "logprobs": 3,
            "return_token_ids": True}
    for c in post(server, "/v1/completions", body).json()["choices"]:
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(c["token_ids"])
        for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            assert len(top) == 3 and chosen <= max(top.values()) + 1e-6
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 6, "n": 2,
            "use_beam_search": True, "logprobs": True, "top_logprobs": 2}
    answer = post(server, "/v1/chat/completions", chat).json()
    assert sum(len(c["logprobs"]["content"]) for c in answer["choices"]) == answer["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 for c in answer["choices"] for e in c["logprobs"]["content"])


def test_chat_refuses_formats_with_beams(server):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "t5"}], "max_tokens": 4, "use_beam_search": True}
    r = post(server, "/v1/chat/completions", {**base, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert "beam search" in r.json()["error"]["message"]


def test_a_batch_line_with_beams_answers_as_the_interactive_request(server):
    from .test_batches import assert_same_answer, content_lines, line, run_batch

    body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 8, "n": 3, "use_beam_search": True}
    batch = run_batch(server, [line("beams", body)])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1, batch
    [out] = content_lines(server, batch["output_file_id"])
    assert_same_answer(out["response"]["body"], post(server, "/v1/completions", body).json(), chat=False)
