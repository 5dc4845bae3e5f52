"""A model whose every layer attends over a sliding window (tiny_phi3: 20 positions, like
Phi-3-mini-4k's 2047 or Mistral 7B v0.1's 4096) gives back the KV blocks behind the window:
a request's context can outgrow the whole cache, and the answers stay transformers'."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from .test_model_vs_hf import hf_greedy, random_prompts
from .test_speculative import always_speculate

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x head_dim 16 x fp32
WINDOW = 20


def held_blocks(kv, req) -> list[int]:
    return [b for b in req.block_ids if b != kv.released_block]


def run_checking_the_cache(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    """Greedy outputs, stepping the engine and checking after every step that each request
    holds no block wholly behind its window and that the reference counts add up."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    kv = engine.kv
    while engine.has_unfinished:
        engine.step()
        refs = [0] * kv.num_blocks
        for r in engine.scheduler.running:
            first_seen = r.num_computed_tokens - WINDOW + 1
            assert r.num_released_blocks == max(first_seen, 0) // kv.block_size
            for b in held_blocks(kv, r):
                refs[b] += 1
        assert refs == kv.ref_counts
    assert all(c == 0 for c in kv.ref_counts)
    return [r.output_token_ids for r in reqs]


def test_a_context_longer_than_the_cache_matches_hf(tiny_phi3):
    # 12 blocks (192 tokens) of cache; a request holds at most a window and a step of 32 tokens.
    llm = LLM(str(tiny_phi3), dtype="float32", progress=False, kv_cache_memory=12 * BLOCK_BYTES,
              max_num_batched_tokens=32)
    assert llm.engine.kv.num_blocks == 12 and llm.engine.max_model_len == 2048  # not capped at 192
    hf = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    prompts = random_prompts([400, 250], hf.config.vocab_size, seed=5)
    outs = run_checking_the_cache(llm, prompts, 30)
    for prompt, out in zip(prompts, outs):
        assert out == hf_greedy(hf, prompt, 30), f"prompt of {len(prompt)} tokens diverged"


def test_speculation_and_prefix_hits_past_the_window(tiny_phi3):
    """n-gram proposals verified past the window give plain decoding's tokens; a second request
    with the same prompt finds its blocks in the prefix cache, though the first gave them back."""
    llm = always_speculate(LLM(str(tiny_phi3), dtype="float32", progress=False, speculative="ngram",
                               kv_cache_memory=64 * BLOCK_BYTES, max_num_batched_tokens=32))
    unit = random_prompts([7], 500, seed=3)[0]
    prompt = unit * 30  # repetitive: the n-gram lookup proposes
    first = run_checking_the_cache(llm, [prompt], 40)[0]
    assert llm.engine.speculator.stats.num_accepted > 0
    plain = LLM(str(tiny_phi3), dtype="float32", progress=False)
    assert first == plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].token_ids
    again = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert again.num_cached_tokens >= 160 and again.token_ids == first


def test_a_windowed_draft_gives_back_its_blocks_too(tiny_phi3):
    """The draft model keeps its own cache of the same size: with a window on every layer it
    also gives back what lies behind it, so it keeps proposing for a context past its cache."""
    llm = always_speculate(LLM(str(tiny_phi3), dtype="float32", progress=False, speculative="draft",
                               draft_model=str(tiny_phi3), draft_quantization="none",
                               kv_cache_memory=12 * BLOCK_BYTES, max_num_batched_tokens=32))
    prompt = random_prompts([400], 500, seed=5)[0]
    out = run_checking_the_cache(llm, [prompt], 30)[0]
    draft = llm.engine.speculator.proposer
    assert draft.window == WINDOW and llm.engine.speculator.stats.num_accepted > 0
    plain = LLM(str(tiny_phi3), dtype="float32", progress=False)
    assert out == plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].token_ids


def test_cuda_graphs_padded_form_reads_past_given_back_blocks(tiny_phi3):
    """A CUDA graph's decode step gathers each row's whole padded context, given-back blocks'
    entries (the scratch block) included, and masks what the window hides: the same answers
    as the regular path (here the padded form runs eagerly, on any machine)."""
    from .test_cuda_graphs import PARAMS, assert_same, engine_pair

    plain, padded, steps = engine_pair(tiny_phi3, {}, max_loras=0, max_num_batched_tokens=256)
    prompts = random_prompts([100, 60, 37], 500, seed=8)
    results = []
    for engine in (plain, padded):
        reqs = [engine.add_request(p, SamplingParams(max_tokens=30, **PARAMS)) for p in prompts]
        most_released = 0
        while engine.has_unfinished:
            engine.step()
            most_released = max([most_released] + [r.num_released_blocks for r in engine.scheduler.running])
        assert most_released >= 6  # the 100-token prompt's first blocks, once it decodes past them
        results.append([(r.output_token_ids, [lp for lp, _ in r.logprobs], []) for r in reqs])
    assert_same(results[1], results[0])
    assert steps, "no decode step took the graphs' padded form"
