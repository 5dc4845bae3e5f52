"""Penalties, logit_bias, allowed_token_ids, bad_words and min_tokens against Hugging Face
transformers' generate on the same weights (its own logits processors where it has them, OpenAI's penalty rule written out
where it has not), in mixed batches, and lossless under speculative decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from loragate.engine import LLM, InvalidRequestError, SamplingParams
from loragate.engine.detokenizer import IncrementalDetokenizer

from .test_model_vs_hf import random_prompts

N = 24


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the generated tokens, written out."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token in set(input_ids[0, self.prompt_len:].tolist()):
            count = int((input_ids[0, self.prompt_len:] == token).sum())
            scores[0, token] -= self.frequency * count + self.presence
        return scores


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False)


def hf_generate(hf, prompt, n, **kw):
    kw.setdefault("min_new_tokens", n)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


def test_penalties_and_bias_match_hf_in_one_mixed_batch(llm, hf):
    prompts = random_prompts([6, 30, 12, 50, 9], hf.config.vocab_size, seed=4)
    cases = [
        (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
        (dict(repetition_penalty=0.7), dict(repetition_penalty=0.7)),
        (dict(presence_penalty=1.5, frequency_penalty=0.8), {}),
        (dict(logit_bias={17: 4.0, 33: -100.0, 201: 2.5}), dict(sequence_bias=[[[17], 4.0], [[33], -100.0], [[201], 2.5]])),
        ({}, {}),
    ]
    # min_tokens=N bans EOS as HF's min_new_tokens=N does: both run all N steps.
    params = [SamplingParams(max_tokens=N, temperature=0, min_tokens=N, **ours) for ours, _ in cases]
    outs = llm.generate(prompts, params)
    for prompt, out, (ours, theirs) in zip(prompts, outs, cases):
        if "presence_penalty" in ours:
            theirs = dict(logits_processor=LogitsProcessorList(
                [OpenAIPenalties(len(prompt), ours["presence_penalty"], ours["frequency_penalty"])]))
        assert out.token_ids == hf_generate(hf, prompt, N, **theirs), ours
    # Every case changed the output (so the test can fail), except the control.
    unadjusted = llm.generate(prompts, SamplingParams(max_tokens=N, temperature=0, min_tokens=N))
    assert [o.token_ids != u.token_ids for o, u in zip(outs, unadjusted)] == [True] * 4 + [False]


def test_allowed_tokens_and_bad_words_match_hf(llm, hf):
    prompts = random_prompts([8, 20, 14], hf.config.vocab_size, seed=9)
    free = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=N, temperature=0, min_tokens=N))]
    allowed = sorted(set(free[0][1::2]) | {40, 41, 42})  # some of its own choices, and three others
    pair = free[1][4:6]  # a two-token word: its second token is banned right after its first
    single = free[2][1]
    params = [SamplingParams(max_tokens=N, temperature=0, min_tokens=N, allowed_token_ids=allowed),
              SamplingParams(max_tokens=N, temperature=0, min_tokens=N, bad_words=[f"t{pair[0]} t{pair[1]}"]),
              SamplingParams(max_tokens=N, temperature=0, min_tokens=N, bad_words=[f"t{single}"])]
    outs = [o.token_ids for o in llm.generate(prompts, params)]  # one batch
    assert outs[0] == hf_generate(hf, prompts[0], N, prefix_allowed_tokens_fn=lambda batch, ids: allowed)
    assert set(outs[0]) <= set(allowed)
    assert outs[1] == hf_generate(hf, prompts[1], N, bad_words_ids=[pair])
    assert outs[2] == hf_generate(hf, prompts[2], N, bad_words_ids=[[single]]) and single not in outs[2]
    assert all(o != f for o, f in zip(outs, free))  # each changed the output


def test_stop_strings_kept_and_special_tokens_shown_on_request(llm):
    tok = llm.tokenizer
    for keep in (False, True):
        detok = IncrementalDetokenizer(tok, SamplingParams(stop=["t9"], include_stop_str_in_output=keep))
        detok.add_tokens([7, 8, 9, 10])
        assert detok.matched_stop == "t9" and detok.text.endswith("t9") == keep and detok.text.startswith("t7")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, SamplingParams(skip_special_tokens=skip))
        detok.add_tokens([7, 2, 8])  # 2: </s>
        assert ("</s>" in detok.text) != skip


def test_min_tokens_holds_back_eos_and_stop_tokens_like_hf(llm, hf):
    prompt = random_prompts([10], hf.config.vocab_size, seed=7)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))[0].token_ids
    stop = free[1]  # would end the request at its second token
    out = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0, stop_token_ids=[stop], min_tokens=6))[0]
    assert stop not in out.token_ids[:6] and len(out.token_ids) > 6
    assert out.token_ids == hf_generate(hf, prompt, N, min_new_tokens=6, eos_token_id=[2, stop])
    short = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0, stop_token_ids=[stop]))[0]
    assert short.token_ids == free[:2] and short.stop_reason == stop


def test_min_tokens_ignores_stop_strings_in_its_first_tokens(llm):
    tok = llm.tokenizer
    free = llm.generate([[1, 40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    word = tok.decode([free.token_ids[0]])
    held = llm.generate([[1, 40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[word],
                                                      min_tokens=3))[0]
    assert free.token_ids[0] not in free.token_ids[3:]  # so nothing after min_tokens stops it
    assert held.token_ids == free.token_ids and held.finish_reason == "length"
    detok = IncrementalDetokenizer(tok, SamplingParams(max_tokens=4, stop=["t9"], min_tokens=2))
    detok.add_tokens([9, 9])
    assert detok.matched_stop is None
    detok.add_tokens([9])
    assert detok.matched_stop == "t9"


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_adjusted_requests_stay_lossless_under_speculation(tiny_llama, llm, mode):
    spec = LLM(str(tiny_llama), dtype="float32", progress=False, speculative=mode,
               **({"draft_model": str(tiny_llama)} if mode == "draft" else {}))
    controller = spec.engine.speculator.controller
    controller.plan = lambda reqs, limits, batch_size: [min(lim, controller.max_k) for lim in limits]
    prompts = [[1] + [7, 8, 9, 10] * 6, [1] + [20, 21] * 10, [1, 5, 6, 7, 8, 5, 6, 7, 8], [1] + [7, 8, 9, 10] * 6,
               [1] + [20, 21] * 10]
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, frequency_penalty=0.5, logit_bias={20: 3}),
              SamplingParams(max_tokens=N, temperature=0, stop_token_ids=[8], min_tokens=5, presence_penalty=-0.5),
              SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, bad_words=["t8 t9", "t21"]),
              SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, allowed_token_ids=[5, 6, 7, 8, 9, 10])]
    want = [o.token_ids for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    assert spec.engine.speculator.stats.mean_accepted_length > 1  # proposals were verified and taken


def test_sampling_never_draws_a_token_biased_away(llm):
    banned = {t: -100.0 for t in range(3, 200)}
    outs = llm.generate([[1, 50, 60]] * 8, [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True,
                                                           logit_bias=banned) for s in range(8)])
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == 128 and not set(tokens) & set(banned)


@pytest.mark.parametrize("fields, param", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={5: 200}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(stop_token_ids=["x"]), "stop_token_ids"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[True]), "allowed_token_ids"),
    (dict(bad_words=[" "]), "bad_words"),
    (dict(bad_words=["x"], grammar='start: "a"'), "allowed_token_ids"),
])
def test_bad_adjustments_are_refused(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**fields)
    assert e.value.param == param


def test_token_ids_beyond_the_vocabulary_are_refused(llm):
    for fields in (dict(logit_bias={512: 1.0}), dict(stop_token_ids=[600]), dict(allowed_token_ids=[5, 512])):
        with pytest.raises(InvalidRequestError, match=r"\[0, 512\)"):
            llm.engine.make_request([1, 2, 3], SamplingParams(**fields))
