"""Beam search (engine/beam_search.py) against transformers' generate(num_beams=...) on the same
weights (fp32): the same hypotheses, in the same order, with the same scores."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, BeamSearchParams, InvalidRequestError

from .test_model_vs_hf import random_prompts


def hf_beams(hf, prompt, params: BeamSearchParams, eos: list[int]):
    """transformers' hypotheses for `prompt`: (generated tokens up to the stop token, score)."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=params.max_tokens, num_beams=params.beam_width,
                      num_return_sequences=params.beam_width, do_sample=False, length_penalty=params.length_penalty,
                      early_stopping=params.early_stopping, eos_token_id=eos, pad_token_id=eos[0],
                      output_scores=True, return_dict_in_generate=True)
    beams = []
    for row in out.sequences[:, len(prompt):].tolist():
        ends = [j for j, t in enumerate(row) if t in eos]
        beams.append(row[:ends[0] + 1] if ends else row)
    scores = out.sequences_scores.tolist() if params.beam_width > 1 else [None]
    return beams, scores


def stops_of(hf, prompt) -> list[int]:
    """Two tokens the greedy continuation emits early: as stop tokens, beams end on them often."""
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(prompt):]
    return [greedy[2].item(), greedy[5].item()]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False), \
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.mark.parametrize("width,length_penalty,early_stopping", [
    (1, 1.0, False), (2, 1.0, False), (4, 1.0, False), (4, 0.0, "never"), (3, 2.0, True), (4, -0.5, False),
    (3, 1.5, "never")])  # the last: "never" finds other hypotheses than False would
@pytest.mark.parametrize("stopping", [False, True], ids=["to-length", "stop-tokens"])
def test_hypotheses_and_scores_match_transformers(llama, width, length_penalty, early_stopping, stopping):
    llm, hf = llama
    prompts = random_prompts([5, 17, 40], hf.config.vocab_size, seed=width)
    eos = sorted(llm.engine.eos_token_ids)
    reasons = []
    # one search per prompt, all batched together; with stop tokens each prompt's own
    for prompt in prompts if stopping else [None]:
        stop = stops_of(hf, prompt) if stopping else []
        params = BeamSearchParams(beam_width=width, max_tokens=12, length_penalty=length_penalty,
                                  early_stopping=early_stopping, stop_token_ids=stop)
        batch = [prompt] if stopping else prompts
        for p, ours in zip(batch, llm.beam_search(batch, params)):
            beams, scores = hf_beams(hf, p, params, eos + stop)
            assert [s.token_ids for s in ours] == beams
            if width > 1:
                assert [s.score for s in ours] == pytest.approx(scores, abs=1e-4)
            reasons += [s.finish_reason for s in ours]
            for s in ours:
                assert s.score == pytest.approx(s.cum_logprob / len(s.token_ids) ** length_penalty)
                assert s.finish_reason == ("stop" if s.token_ids[-1] in eos + stop else "length")
                assert s.stop_reason == (s.token_ids[-1] if s.token_ids[-1] in stop else None)
                assert s.text == llm.tokenizer.decode(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids,
                                                      skip_special_tokens=True)
    if stopping:  # the stop tokens were met: the test saw beams end early
        assert "stop" in reasons


def test_hypotheses_carry_their_tokens_logprobs_as_the_model_gives_them(llama):
    llm, hf = llama
    prompt = random_prompts([12], hf.config.vocab_size, seed=11)[0]
    for s in llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=8, logprobs=4))[0]:
        assert len(s.logprobs) == len(s.token_ids)
        assert sum(lp for lp, _ in s.logprobs) == pytest.approx(s.cum_logprob, abs=1e-4)
        with torch.no_grad():
            rows = hf(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        for (lp, alternatives), token, row in zip(s.logprobs, s.token_ids, rows):
            assert lp == pytest.approx(row[token].item(), abs=1e-4)
            top = row.topk(4)
            assert list(alternatives) == top.indices.tolist()
            assert list(alternatives.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3"])
def test_sliding_window_models_match_transformers_and_compute_one_token_per_beam(request, arch):
    """Qwen3's second layer, every Phi-3 layer and five of six Gemma 3 layers attend over a
    window of 20 tokens, which the searches outgrow; the kept partial blocks are every group's."""
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    llm = LLM(str(model_dir), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = BeamSearchParams(beam_width=3, max_tokens=16)
    prompts = random_prompts([30, 9], hf.config.vocab_size)
    before = llm.engine.num_computed_tokens_total
    searched = llm.beam_search(prompts, params)
    assert llm.engine.num_computed_tokens_total - before <= 39 + 2 * (params.max_tokens - 1) * params.beam_width
    for prompt, ours in zip(prompts, searched):
        assert [s.token_ids for s in ours] == hf_beams(hf, prompt, params, sorted(llm.engine.eos_token_ids))[0]


def test_an_adapters_beams_match_peft(tiny_llama, tmp_path, save_lora):
    path = save_lora(tiny_llama, tmp_path / "adapter", 0.3, seed=1, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "down_proj"])
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, max_loras=2)
    llm.add_adapter("a", path)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), path)
    params = BeamSearchParams(beam_width=4, max_tokens=10)
    prompts = random_prompts([7, 21], 512, seed=3)
    adapted = llm.beam_search(prompts, params, adapter="a")
    for prompt, ours in zip(prompts, adapted):
        assert [s.token_ids for s in ours] == hf_beams(peft, prompt, params, sorted(llm.engine.eos_token_ids))[0]
    assert [s.token_ids for s in adapted[0]] != [s.token_ids for s in llm.beam_search(prompts[:1], params)[0]]


@pytest.mark.parametrize("fields,param", [
    ({"beam_width": 0}, "n"), ({"beam_width": True}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"early_stopping": 1}, "early_stopping"), ({"early_stopping": "soon"}, "early_stopping"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"length_penalty": 1000.0}, "length_penalty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"logprobs": 21}, "logprobs")])
def test_bad_settings_are_refused(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        BeamSearchParams(**fields)
    assert e.value.param == param


def test_a_search_that_cannot_fit_the_context_is_refused_before_it_runs(llama):
    llm, _ = llama
    with pytest.raises(InvalidRequestError, match="context"):
        llm.beam_search([[5] * 2040], BeamSearchParams(beam_width=2, max_tokens=16))
    assert not llm.engine.has_unfinished


def test_each_step_computes_one_token_per_beam(llama):
    """A step's requests copy their beam's last partial K/V block (engine/kv_cache.py) rather
    than computing up to a block of tokens again."""
    llm, _ = llama
    prompt = random_prompts([40], 512, seed=9)[0]
    params = BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True)
    before = llm.engine.num_computed_tokens_total
    llm.beam_search([prompt], params)
    assert llm.engine.num_computed_tokens_total - before <= len(prompt) + (params.max_tokens - 1) * params.beam_width


@pytest.mark.slow
def test_the_bundled_model_searches_as_transformers_does_in_fp32(real_model_dir):
    llm = LLM(str(real_model_dir), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
               for q in ("What is the capital of Germany?", "Write a haiku about the sea.")]
    params = BeamSearchParams(beam_width=4, max_tokens=24)
    eos = sorted(llm.engine.eos_token_ids)
    for prompt, ours in zip(prompts, llm.beam_search(prompts, params)):
        beams, scores = hf_beams(hf, prompt, params, eos)
        assert [s.token_ids for s in ours] == beams
        assert [s.score for s in ours] == pytest.approx(scores, abs=1e-4)


def test_a_bad_prompt_among_several_starts_no_search(llama):
    llm, _ = llama
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        llm.beam_search([[5, 6, 7], [5, 99999]], BeamSearchParams(beam_width=2, max_tokens=4))
    assert not llm.engine.has_unfinished
    one = llm.beam_search([5, 6, 7], BeamSearchParams(beam_width=2, max_tokens=4))  # a single prompt, as generate takes
    assert len(one) == 1 and len(one[0]) == 2
