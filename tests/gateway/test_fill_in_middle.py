"""Fill in the middle: /v1/completions with OpenAI's `suffix` lays the prompt out in the
model's FIM format (engine/fill_in_middle.py) and stops where the model marks the gap filled.
Checked against transformers' greedy tokens on the same ids, through the official client."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from loragate.engine.fill_in_middle import MARKERS, fim_format

from ..conftest import TINY_VOCAB
from .conftest import _module_server

QWEN_STYLE = {"<|fim_prefix|>": 500, "<|fim_suffix|>": 501, "<|fim_middle|>": 502, "<|fim_pad|>": 503,
              "<|endoftext|>": 504, "<|file_sep|>": 505}


def word_tokenizer(specials: dict[str, int]) -> PreTrainedTokenizerFast:
    """The tiny models' word-level vocabulary with some of its ids renamed to special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, TINY_VOCAB)}
    vocab = {k: v for k, v in vocab.items() if v not in specials.values()} | specials
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(specials))


@pytest.fixture(scope="module")
def fim_model(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-fim")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    word_tokenizer(QWEN_STYLE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fim_server(fim_model, tmp_path_factory, monkeypatch_module):
    yield from _module_server(fim_model, tmp_path_factory, monkeypatch_module)


@pytest.mark.parametrize("markers", MARKERS)
def test_each_familys_markers_are_found_with_the_tokens_that_end_a_middle(markers):
    specials = dict(zip(markers, (500, 501, 502))) | {"<|endoftext|>": 510, "<fim_pad>": 511}
    fim = fim_format(word_tokenizer(specials))
    assert (fim.prefix, fim.suffix, fim.middle) == markers
    assert fim.stop_token_ids == (500, 501, 502, 510, 511)
    tok = word_tokenizer(specials)
    ids = tok.encode(fim.prompt("t7 t8", "t9"), add_special_tokens=False)
    assert ids == [500, 7, 8, 501, 9, 502]
    incomplete = dict(zip(markers[:2], (500, 501)))  # no middle marker: not a FIM model
    assert fim_format(word_tokenizer(incomplete)) is None


def hf_middle(model_dir, ids: list[int], stops: list[int], max_tokens: int) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                      pad_token_id=0)[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] in stops else out


def test_the_middle_is_transformers_greedy_one_and_ends_at_a_fim_token(fim_server, fim_model):
    c = openai.OpenAI(base_url=fim_server.url + "/v1", api_key="key-a", max_retries=0)
    prefix, suffix = "t10 t11 t12 t13", "t20 t21"
    ids = [500, 10, 11, 12, 13, 501, 20, 21, 502]
    stops = [2, *QWEN_STYLE.values()]
    want = hf_middle(fim_model, ids, stops, 12)
    assert want
    tok = fim_server.state.engine.tokenizer
    got = c.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
    assert got.choices[0].text == tok.decode(want)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].finish_reason == ("stop" if len(want) < 12 else "length")
    streamed = c.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == got.choices[0].text
    # The model saying the gap is filled (here forced: <|fim_pad|> first) ends the middle,
    # as does the end of a document.
    for ending in (503, 504):
        done = c.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0,
                                    logit_bias={str(ending): 100})
        assert done.choices[0].text == "" and done.choices[0].finish_reason == "stop"
        assert done.usage.completion_tokens == 1
    # Without a suffix the same prompt is a plain completion.
    plain = c.completions.create(model="tiny", prompt=prefix, max_tokens=3, temperature=0)
    assert plain.usage.prompt_tokens == 4


def test_loragate_generate_fills_in_the_middle_too(fim_model, capsys):
    from loragate.gateway.cli import main

    want = hf_middle(fim_model, [500, 10, 11, 501, 20, 502], [2, *QWEN_STYLE.values()], 6)
    assert want
    assert main(["generate", "--model", str(fim_model), "--dtype", "float32", "--quiet", "--prompt", "t10 t11",
                 "--suffix", "t20", "--max-tokens", "6"]) == 0
    tok = AutoTokenizer.from_pretrained(fim_model)
    assert capsys.readouterr().out == tok.decode(want) + "\n"


@pytest.mark.parametrize("body, message", [
    ({"prompt": [10, 11], "suffix": "t20"}, "prompt as text"),
    ({"prompt": "t10", "suffix": "t20", "echo": True}, "'echo' cannot be combined"),
    ({"prompt": "t10", "suffix": 5}, "'suffix' must be of type str"),
])
def test_bad_suffix_requests_are_400s(fim_server, body, message):
    r = httpx.post(fim_server.url + "/v1/completions", headers=fim_server.headers(), json={"model": "tiny", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert message in r.json()["error"]["message"]


def test_a_model_without_fim_markers_says_so(server):
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "t10", "suffix": "t20"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "<|fim_prefix|>" in r.json()["error"]["message"]
