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
    """(logprob of token p+1, top-TOP ids) for every prompt position but the last."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(prompt[1:])
    return logp.gather(1, targets[:, None]).squeeze(1), logp.topk(TOP, dim=-1)


def check(entries, model, prompt):
    chosen, (top_vals, top_ids) = reference(model, prompt)
    assert len(entries) == len(prompt) - 1
    ours = torch.tensor([lp for lp, _ in entries])
    torch.testing.assert_close(ours, chosen, atol=LOGIT_ATOL, rtol=0)
    for (_, alts), vals, ids in zip(entries, top_vals, top_ids):
        assert list(alts) == ids.tolist()
        torch.testing.assert_close(torch.tensor(list(alts.values())), vals, atol=LOGIT_ATOL, rtol=0)


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
    torch.testing.assert_close(torch.tensor([lp for lp, _ in scored.prompt_logprobs]), chosen, atol=LOGIT_ATOL, rtol=0)
    assert all(alts == {} for _, alts in scored.prompt_logprobs)


def test_prompt_logprobs_under_an_adapter_match_peft(tiny_llama, tmp_path, save_lora):
    adapter = save_lora(tiny_llama, tmp_path / "a", 0.2, seed=1, r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
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
