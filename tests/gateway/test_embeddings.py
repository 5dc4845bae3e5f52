"""/v1/embeddings through the official `openai` client: last-token, first-token, mean and max
pooling of the final hidden states against transformers' last_hidden_state (and peft's, with
an adapter), normalization and --pooler-config, `dimensions`, base64, bad input, tenants, and
the engine's chunked prefill."""

from __future__ import annotations

import base64
import json
import shutil
import struct

import httpx
import openai
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from loragate.engine.errors import ModelConfigError
from loragate.gateway.embeddings_api import pooling_of
from loragate.gateway.settings import GatewaySettings

from ..engine.test_model_vs_hf import random_prompts
from .conftest import _module_server


def hf_embedding(model, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    states = out.hidden_states[-1][0] if hasattr(out, "hidden_states") and out.hidden_states else out.last_hidden_state[0]
    vector = {"last": lambda: states[-1], "first": lambda: states[0], "mean": lambda: states.mean(0),
              "max": lambda: states.amax(0)}[pooling]()
    return vector / vector.norm()


@pytest.mark.parametrize("pooling", ["last", "first", "mean", "max"])
def test_the_engine_pools_hf_last_hidden_state_across_prefill_chunks(tiny_qwen3, pooling):
    """32-token chunks: a 90-token prompt's mean or max combines three chunks' parts; prefix
    hits are taken only for last-token pooling (the others need earlier positions' states)."""
    llm = LLM(str(tiny_qwen3), dtype="float32", progress=False, max_num_batched_tokens=32)
    hf = AutoModel.from_pretrained(tiny_qwen3, dtype=torch.float32)
    prompts = random_prompts([90, 7, 50], 500, seed=3)
    for attempt in range(2):  # the second time, the prompts' blocks are cached
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, pooling=pooling))
        for prompt, out in zip(prompts, outs):
            got = torch.tensor(out.embedding)
            torch.testing.assert_close(got / got.norm(), hf_embedding(hf, prompt, pooling), atol=2e-5, rtol=0)
            assert out.num_cached_tokens == (0 if attempt == 0 or pooling != "last" else (len(prompt) - 1) // 16 * 16)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, monkeypatch_module):
    yield from _module_server(tiny_llama, tmp_path_factory, monkeypatch_module)


def test_embeddings_with_the_official_client(server, tiny_llama):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    texts = ["t5 t6 t7 t8", "t9 t10"]
    got = c.embeddings.create(model="tiny", input=texts)
    tok = server.state.engine.tokenizer
    hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32)
    for i, text in enumerate(texts):
        want = hf_embedding(hf, tok.encode(text), "last")
        assert got.data[i].index == i
        torch.testing.assert_close(torch.tensor(got.data[i].embedding), want, atol=2e-5, rtol=0)
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    ids = c.embeddings.create(model="tiny", input=[tok.encode(texts[0])])  # token ids
    assert ids.data[0].embedding == pytest.approx(got.data[0].embedding, abs=1e-6)  # batched otherwise: fp32 rounding
    cut = c.embeddings.create(model="tiny", input=texts[0], dimensions=8).data[0].embedding
    full = torch.tensor(got.data[0].embedding[:8])
    torch.testing.assert_close(torch.tensor(cut), full / full.norm(), atol=1e-6, rtol=0)
    raw = httpx.post(server.url + "/v1/embeddings", headers=server.headers(),
                     json={"model": "tiny", "input": texts[1], "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(got.data[1].embedding, abs=1e-6)


def test_an_adapter_embeds_as_peft_does(server, tiny_llama, tmp_path, save_lora):
    from peft import PeftModel

    path = save_lora(tiny_llama, tmp_path / "emb", 0.3, seed=5, r=8, lora_alpha=16, target_modules="all-linear")
    files = {f.name: (f.name, f.read_bytes()) for f in path.iterdir() if f.is_file()}
    r = httpx.post(server.url + "/v1/adapters", headers=server.headers(), data={"name": "emb"},
                   files=[("files", v) for v in files.values()], timeout=60)
    assert r.status_code in (200, 201), r.text
    text = "t5 t6 t7 t8 t9"
    got = httpx.post(server.url + "/v1/embeddings", headers=server.headers(),
                     json={"model": "emb", "input": text}).json()["data"][0]["embedding"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, path).eval()
    want = hf_embedding(peft, server.state.engine.tokenizer.encode(text), "last")
    torch.testing.assert_close(torch.tensor(got), want, atol=2e-5, rtol=0)
    other = httpx.post(server.url + "/v1/embeddings", headers=server.headers("key-b"),
                       json={"model": "emb", "input": text})
    assert other.status_code == 404  # another tenant's adapter


@pytest.mark.parametrize("body, param", [
    ({"input": "t5"}, "model"),
    ({"model": "tiny", "input": ""}, "input"),
    ({"model": "tiny", "input": []}, "input"),
    ({"model": "tiny", "input": ["t5", 7]}, "input"),
    ({"model": "tiny", "input": ["t5"] * 2049}, "input"),
    ({"model": "tiny", "input": [[10 ** 7]]}, "input"),
    ({"model": "tiny", "input": " ".join(["t5"] * 2048)}, "input"),  # past the context
    ({"model": "tiny", "input": "t5", "dimensions": 0}, "dimensions"),
    ({"model": "tiny", "input": "t5", "dimensions": 65}, "dimensions"),
    ({"model": "tiny", "input": "t5", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "tiny", "input": "t5", "normalize": "yes"}, "normalize"),
    ({"model": "tiny", "input": "t5", "add_special_tokens": "no"}, "add_special_tokens"),
    ({"model": "tiny", "input": "t5", "messages": [{"role": "user", "content": "t5"}]}, "messages"),
    ({"model": "tiny", "messages": "t5"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t5"}], "continue_final_message": True,
      "add_generation_prompt": False}, "continue_final_message"),
])
def test_bad_embedding_requests_are_400s(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", headers=server.headers(), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert server.state.engine.num_waiting == 0 and server.state.tenant_in_flight == {}


def test_a_chat_is_embedded_as_its_template_renders_it(server, monkeypatch):
    """vLLM's chat form: `messages` through the chat template, by default without the generation
    prompt and without special tokens beyond the template's; both can be asked for."""
    from tokenizers.processors import TemplateProcessing

    tok = server.state.engine.tokenizer
    # The tiny tokenizer adds no BOS of its own: now it does, so add_special_tokens tells
    monkeypatch.setattr(tok._tokenizer, "post_processor", TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)]))
    assert tok.encode("t5", add_special_tokens=True) == [1, 5]
    messages = [{"role": "system", "content": "t3 t4"}, {"role": "user", "content": "t5 t6 t7"}]

    def embedding(**body):
        r = httpx.post(server.url + "/v1/embeddings", headers=server.headers(), json={"model": "tiny", **body})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"], r.json()["usage"]["prompt_tokens"]

    for options in ({}, {"add_generation_prompt": True}):
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **options)
        got, tokens = embedding(messages=messages, **options)
        assert tokens == len(ids)
        assert got == pytest.approx(embedding(input=ids)[0], abs=1e-6)
    text = tok.apply_chat_template(messages, tokenize=False)
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos[0] == 1 and embedding(messages=messages, add_special_tokens=True) == embedding(input=[with_bos])
    for special in (True, False):  # the plain form's default is true
        ids = [1, 5, 6, 7] if special else [5, 6, 7]
        assert embedding(input="t5 t6 t7", **({} if special else {"add_special_tokens": False})) == \
            embedding(input=[ids])


def test_the_pooling_follows_a_sentence_transformers_config(tiny_llama, tmp_path):
    from loragate.gateway.errors import APIError

    for modes, want in (({"pooling_mode_mean_tokens": True}, "mean"), ({"pooling_mode_lasttoken": True}, "last"),
                        ({"pooling_mode_cls_token": True}, "first"), ({"pooling_mode_max_tokens": True}, "max"),
                        ({"pooling_mode_mean_sqrt_len_tokens": True}, None)):
        model = tmp_path / want.__repr__()
        shutil.copytree(tiny_llama, model)
        (model / "1_Pooling").mkdir()
        (model / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
        if want is None:
            with pytest.raises(APIError, match=r"pooling \(mean_sqrt_len_tokens\) is not supported"):
                pooling_of(model)
        else:
            assert pooling_of(model) == want
    assert pooling_of(tiny_llama) == "last"


def test_the_pooler_config_and_a_requests_normalize_shape_the_vectors(server, tiny_llama, monkeypatch):
    """--pooler-config (as GatewaySettings.pooler parses it) picks the pooling and turns
    normalization off; a request's own `normalize` wins."""
    pooler = GatewaySettings(pooler_config='{"pooling_type": "CLS", "normalize": false}').pooler()
    assert pooler == ("first", False)
    monkeypatch.setattr(server.state, "pooler", pooler)
    ids = server.state.engine.tokenizer.encode("t5 t6 t7 t8")
    with torch.no_grad():
        first = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32)(torch.tensor([ids])).last_hidden_state[0, 0]

    def vector(**body):
        r = httpx.post(server.url + "/v1/embeddings", headers=server.headers(), json={"model": "tiny", "input": ids, **body})
        return torch.tensor(r.json()["data"][0]["embedding"])

    torch.testing.assert_close(vector(), first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vector(normalize=True), first / first.norm(), atol=2e-5, rtol=0)
    torch.testing.assert_close(vector(normalize=None), first, atol=1e-4, rtol=1e-4)  # null: the server's default


@pytest.mark.parametrize("config, error", [
    ("MEAN", "must be a JSON object"),
    ('{"pooling_type": "ALL"}', "pooling_type must be one of LAST, CLS, MEAN, MAX"),
    ('{"pooling_type": "MEAN", "dimensions": 8}', "dimensions not supported"),
    ('{"normalize": "no"}', "normalize must be true or false"),
])
def test_a_pooler_config_the_server_cannot_follow_is_refused_at_start(config, error):
    with pytest.raises(ModelConfigError, match=error):
        GatewaySettings(pooler_config=config)
    assert GatewaySettings(pooler_config='{"pooling_type": "MAX"}').pooler() == ("max", True)
    assert GatewaySettings().pooler() == (None, True)
