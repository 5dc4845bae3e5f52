"""Prompt logprobs (what eval harnesses score with) against HF transformers and peft on the
same weights (fp32): whole and chunked prefills, a prompt whose prefix is cached, an adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams

from .test_model_vs_hf import LOGIT_ATOL, random_prompts

TOP = 3


def reference(model, prompt):
    """(logprob of token p+1 [n], all logprobs [n, V]) for every prompt position p but the last."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1), logp


def check(entries, model, prompt):
    """Each chosen logprob within LOGIT_ATOL of HF's; each position's alternatives are the
    top ones (ties within LOGIT_ATOL may come in either order), with HF's values."""
    chosen, logp = reference(model, prompt)
    assert len(entries) == len(prompt) - 1
    torch.testing.assert_close(torch.tensor([lp for lp, _, _ in entries]), chosen, atol=LOGIT_ATOL, rtol=0)
    for (_, alts, rank), row, lp in zip(entries, logp, chosen):
        # vLLM's rank: 1 + the tokens likelier (ties within LOGIT_ATOL may count either way)
        assert int((row > lp + LOGIT_ATOL).sum()) + 1 <= rank <= int((row >= lp - LOGIT_ATOL).sum())
        ids, vals = torch.tensor(list(alts)), torch.tensor(list(alts.values()))
        if alts:
            torch.testing.assert_close(vals, row[ids], atol=LOGIT_ATOL, rtol=0)
            assert bool((vals >= row.topk(len(alts)).values[-1] - LOGIT_ATOL).all())


@pytest.mark.parametrize("chunk", [1024, 32], ids=["whole", "chunked"])
def test_prompt_logprobs_match_hf(tiny_model, chunk):
    llm = LLM(str(tiny_model), dtype="float32", progress=False, max_num_batched_tokens=chunk)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = random_prompts([2, 17, 100, 250], hf.config.vocab_size, seed=3)
    params = [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=TOP)] * 3 + [SamplingParams(max_tokens=2)]
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts[:3], outs):
        check(out.prompt_logprobs, hf, prompt)
    assert outs[3].prompt_logprobs is None


def test_scored_prefixes_are_reused_with_their_kept_logprobs(tiny_llama):
    """What eval harnesses send: one context, several continuations, each scored. The later
    ones reuse the context's blocks (all but the last, whose kept entries cover the token
    the first computed position no longer predicts) and still match HF everywhere."""
    llm = LLM(str(tiny_llama), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    context = random_prompts([100], hf.config.vocab_size, seed=21)[0]  # 6 full blocks of 16, and 4 tokens
    endings = random_prompts([3, 7, 12], hf.config.vocab_size, seed=22)
    first = llm.generate([context + endings[0]], SamplingParams(max_tokens=1, prompt_logprobs=TOP))[0]
    assert first.num_cached_tokens == 0
    check(first.prompt_logprobs, hf, context + endings[0])
    for ending in endings[1:]:
        out = llm.generate([context + ending], SamplingParams(max_tokens=1, prompt_logprobs=TOP))[0]
        assert out.num_cached_tokens == 5 * 16
        check(out.prompt_logprobs, hf, context + ending)
    fewer = llm.generate([context], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]  # kept top-3 serve top-1
    assert fewer.num_cached_tokens == 5 * 16 and all(len(alts) == 1 for _, alts, _ in fewer.prompt_logprobs)
    check(fewer.prompt_logprobs, hf, context)
    more = llm.generate([context], SamplingParams(max_tokens=1, prompt_logprobs=5))[0]  # kept top-3 cannot serve top-5
    assert more.num_cached_tokens == 0 and all(len(alts) == 5 for _, alts, _ in more.prompt_logprobs)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompt = random_prompts([80], hf.config.vocab_size, seed=5)[0]
    llm.generate([prompt], SamplingParams(max_tokens=1))  # caches its full blocks
    plain = llm.generate([prompt], SamplingParams(max_tokens=1))[0]
    assert plain.num_cached_tokens > 0  # without prompt logprobs the cache serves it
    scored = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert scored.num_cached_tokens == 0
    chosen, _ = reference(hf, prompt)
    torch.testing.assert_close(torch.tensor([lp for lp, _, _ in scored.prompt_logprobs]), chosen, atol=LOGIT_ATOL, rtol=0)
    assert all(alts == {} for _, alts, _ in scored.prompt_logprobs)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["lm_head", "embed_tokens"]])
def test_prompt_logprobs_under_an_adapter_match_peft(tiny_llama, tmp_path, save_lora, targets):
    adapter = save_lora(tiny_llama, tmp_path / "a", 0.2, seed=1, r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, max_loras=2)
    llm.add_adapter("a", adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompt = random_prompts([60], base.config.vocab_size, seed=9)[0]
    params = SamplingParams(max_tokens=1, prompt_logprobs=TOP)
    with_adapter, without = llm.generate([prompt, prompt], params, adapters=["a", None])
    check(without.prompt_logprobs, base, prompt)
    check(with_adapter.prompt_logprobs, PeftModel.from_pretrained(base, adapter).eval(), prompt)


def test_preempted_requests_report_each_prompt_position_once(tiny_llama):
    """A KV cache too small for all of them: requests are preempted mid-prefill and
    recomputed, and each prompt position's logprob is still reported once, correct."""
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, max_num_batched_tokens=32, kv_cache_memory="128KiB",
              max_num_seqs=6)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompts = random_prompts([60, 75, 90, 100, 70, 85], hf.config.vocab_size, seed=11)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=TOP))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        check(out.prompt_logprobs, hf, prompt)
