"""Our model and engine against Hugging Face transformers on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from loragate.engine.batch import build_batch
from loragate.engine.kv_cache import KVCacheManager
from loragate.engine.model_runner import ModelRunner
from loragate.engine.models.loader import load_model
from loragate.engine.request import Request

PROMPT_LENGTHS = [1, 5, 17, 40, 100, 3, 64, 250]
# fp32 logits of two implementations that sum in different orders.
LOGIT_ATOL = 1e-4


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_match_hf_for_mixed_batch(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = random_prompts(PROMPT_LENGTHS, hf.config.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens diverged"


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_prefill_and_decode_logits_match_hf(tiny_model, use_native):
    """One packed prefill of all prompts, then one batched decode step at eight different
    context lengths: every logit row within LOGIT_ATOL of HF's."""
    model, _ = load_model(tiny_model, torch.float32, 2048)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=1)
    block_size = 16
    kv = KVCacheManager(num_blocks=64, block_size=block_size)
    runner = ModelRunner(model, 64, block_size)
    reqs = [Request(f"r{i}", p, SamplingParams(temperature=0)) for i, p in enumerate(prompts)]
    for r in reqs:
        assert kv.allocate(r, r.num_tokens)
    with torch.inference_mode():
        batch = build_batch([(r, r.num_tokens) for r in reqs], block_size, use_native)
        logits = model.compute_logits(model(batch.input_ids, batch.positions, runner.kv_caches, batch))
        start = 0
        next_tokens = []
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[start:start + len(p)], ref, atol=LOGIT_ATOL, rtol=0)
            next_tokens.append(int(ref[-1].argmax()))
            start += len(p)
        for r, t in zip(reqs, next_tokens):
            r.num_computed_tokens = r.num_tokens
            r.output_token_ids.append(t)
            assert kv.allocate(r, 1)
        batch = build_batch([(r, 1) for r in reqs], block_size, use_native)
        assert batch.attention.query_start is not None  # the short-query path ran
        logits = model.compute_logits(model(batch.input_ids, batch.positions, runner.kv_caches, batch))
        for i, r in enumerate(reqs):
            ref = hf(torch.tensor([r.all_token_ids])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_real_smollm2_matches_hf_fp32(real_model_dir):
    llm = LLM(str(real_model_dir), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    tok = llm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
             "List three primary colors:", "Translate to German: good morning",
             "The quick brown fox " * 20, "Water boils at", "import numpy as np\n" * 3]
    prompts = [tok.encode(t) for t in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 24), tok.decode(prompt)
    assert_prefill_logits_close(llm.engine.model, hf, prompts[5])


def assert_prefill_logits_close(model, hf, prompt, atol=2e-3):
    """The logits of a whole prompt in one prefill step (on the engine's device), against HF's
    forward on the CPU."""
    with torch.inference_mode():
        req = Request("x", prompt, SamplingParams())
        blocks = max(64, -(-len(prompt) // 16))
        kv = KVCacheManager(blocks, 16)
        runner = ModelRunner(model, blocks, 16)
        kv.allocate(req, len(prompt))
        batch = build_batch([(req, len(prompt))], 16).to(runner.device)
        logits = model.compute_logits(model(batch.input_ids, batch.positions, runner.kv_caches, batch)).cpu()
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, atol=atol, rtol=0)


@pytest.mark.slow
def test_real_gemma3_270m_matches_hf_fp32(real_gemma3_dir):
    """Gemma 3 270M: greedy tokens identical to transformers', a prompt of 700 tokens past its
    512-token sliding window included, and the long prompt's logits (prefill path) close."""
    import inspect

    import argparse as text

    llm = LLM(str(real_gemma3_dir), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(real_gemma3_dir, dtype=torch.float32)
    tok = llm.tokenizer
    long_prompt = tok.encode(inspect.getsource(text))[:700]
    prompts = [tok.encode(t) for t in ["The capital of France is", "def fibonacci(n):", "Once upon a time"]]
    outs = llm.generate(prompts + [long_prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts + [long_prompt], outs):
        assert out.token_ids == hf_greedy(hf, prompt, 16), tok.decode(prompt[:20])
    assert_prefill_logits_close(llm.engine.model, hf, long_prompt)


def test_gemma3_multimodal_checkpoint_serves_text_like_hf(tiny_gemma3_multimodal):
    """A Gemma 3 image + text checkpoint (4B and up are these): its language model, read from
    the checkpoint's nested names with the vision tower skipped, gives transformers' tokens."""
    llm = LLM(str(tiny_gemma3_multimodal), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3_multimodal, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    prompts = random_prompts([3, 30, 90], 500, seed=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens diverged"
    assert_prefill_logits_close(llm.engine.model, hf, prompts[2], atol=LOGIT_ATOL)


def test_sliding_windows_hold_across_prefill_chunks_and_cached_prefixes(tiny_gemma3, tiny_gemma2, tiny_qwen3,
                                                                        tiny_phi3, tiny_olmo3):
    """Prompts far past the windows (Gemma's and OLMo 3's 12 tokens, Qwen3's and Phi-3's 20)
    prefilled in 32-token chunks, then again sharing a cached prefix: each chunk's queries see
    only their windows (tokens and their logprobs as transformers gives them)."""
    from .test_multi_lora import peft_greedy

    for model_dir in (tiny_gemma3, tiny_gemma2, tiny_qwen3, tiny_phi3, tiny_olmo3):
        engine = LLM(str(model_dir), dtype="float32", progress=False, max_num_batched_tokens=32).engine
        prompts = random_prompts([150, 97], 500, seed=7)
        prompts.append(prompts[0][:120] + prompts[1][:30])  # 7 cached blocks, then a new suffix
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
        reqs = []
        for batch in (prompts[:2], prompts[2:]):
            reqs += [engine.add_request(p, params) for p in batch]
            while engine.has_unfinished:
                engine.step()
        assert engine.kv.num_prefix_hit_tokens >= 112
        for prompt, req in zip(prompts, reqs):
            tokens, logprobs = peft_greedy(model_dir, None, prompt, 10)
            assert req.output_token_ids == tokens, f"{model_dir.name}: prompt of {len(prompt)} diverged"
            torch.testing.assert_close(torch.tensor([lp for lp, _ in req.logprobs]),
                                       logprobs[torch.arange(10), torch.tensor(tokens)], atol=LOGIT_ATOL, rtol=0)


def test_phi3_longrope_serves_the_context_where_it_is_exact(tiny_phi3, capsys):
    """Past original_max_position_embeddings (2048 of this model's 4096), transformers switches
    LongRoPE to its long factors for a whole forward pass, so a position's rotation would depend
    on how the sequence was split. By default the engine serves the 2048 positions where only
    the short factors apply, and matches transformers up to the last one."""
    llm = LLM(str(tiny_phi3), dtype="float32", progress=True)
    assert llm.engine.max_model_len == 2048
    assert "LongRoPE" not in capsys.readouterr().err
    prompt = random_prompts([2036], 500, seed=9)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    assert out.token_ids == hf_greedy(hf, prompt, 12)


def test_phi3_longrope_long_factors_past_original_max(tiny_phi3, capsys):
    """A max_model_len past original_max_position_embeddings serves it with the long factors at
    every position, as vLLM does (and says so): a prompt past 2048 tokens, which transformers
    runs on the long factors from its prefill on, gives transformers' tokens and logits. Asked
    for more than max_position_embeddings, it serves those; a KV cache that holds no more than
    the short factors serve is named in the message."""
    short = LLM(str(tiny_phi3), dtype="float32", progress=False).engine.model
    llm = LLM(str(tiny_phi3), dtype="float32", max_model_len=4096, progress=True)
    assert llm.engine.max_model_len == 4096
    err = capsys.readouterr().err
    assert "long factors apply to every position" in err and "--max-model-len <= 2048 keeps the short" in err
    model = llm.engine.model
    assert model.rope_cos.shape[0] == 4096
    for long_table, short_table in ((model.rope_cos, short.rope_cos), (model.rope_sin, short.rope_sin)):
        assert not torch.allclose(long_table[:2048], short_table)
    prompt = random_prompts([2100], 500, seed=9)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    assert out.token_ids == hf_greedy(hf, prompt, 12)
    assert_prefill_logits_close(model, hf, prompt, atol=LOGIT_ATOL)

    capped = LLM(str(tiny_phi3), dtype="float32", max_model_len=5000, kv_cache_memory=2**18, progress=True).engine
    err = capsys.readouterr().err
    assert "max_model_len 5000 is more than this model's 4096 positions; serving 4096" in err
    assert capped.max_model_len <= 2048 and "raise --kv-cache-memory" in err


def test_sparse_expert_models_match_hf(tiny_moe):
    """Mixtral and Qwen3-MoE: each token's top-2 experts, weighted as the router gives them
    (renormalised or not), in a mixed batch and decoded, then one prompt's prefill logits."""
    llm = LLM(str(tiny_moe), dtype="float32", progress=False)
    assert llm.engine.model.config.is_moe
    hf = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    prompts = random_prompts(PROMPT_LENGTHS, hf.config.vocab_size, seed=11)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens diverged"
    assert_prefill_logits_close(llm.engine.model, hf, prompts[4], atol=LOGIT_ATOL)


def test_a_next_turn_reuses_the_answers_partial_block_and_answers_like_hf(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompt, more = random_prompts([21, 5], hf.config.vocab_size, seed=5)
    first = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    turn = prompt + first.token_ids + more
    second = llm.generate([turn], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    # the first request computed 30 rows (its last token never ran): one block of 16 and 14
    # rows of a partial one, copied rather than computed again
    assert second.num_cached_tokens == 30
    assert second.token_ids == hf_greedy(hf, turn, 10)
