"""Layers that attend over a sliding window give back the KV blocks behind it. Where every
layer has one (tiny_phi3: 20 positions, like Phi-3-mini-4k's 2047 or Mistral 7B v0.1's 4096),
a request's context can outgrow the whole cache; where some do (tiny_gemma3: two windowed
layers of 12 around a full-attention one, like Gemma 3's five to one), it costs the
full-attention layers' share of the cache. The answers stay transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from .test_model_vs_hf import hf_greedy, random_prompts
from .test_speculative import always_speculate

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x head_dim 16 x fp32
WINDOW = 20


def held_blocks(kv, req) -> list[int]:
    return [b for table in req.block_tables for b in table if b != kv.released_block]


def run_checking_the_cache(llm: LLM, prompts, max_tokens: int, window: int = WINDOW) -> list[list[int]]:
    """Greedy outputs, stepping the engine and checking after every step that each request
    holds no windowed group's block wholly behind its window, every full-attention group's
    block, and that the reference counts add up."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    kv = engine.kv
    while engine.has_unfinished:
        engine.step()
        refs = [0] * kv.num_blocks
        for r in engine.scheduler.running:
            released = max(r.num_computed_tokens - window + 1, 0) // kv.block_size
            assert r.num_released_blocks == released
            for table, group_window in zip(r.block_tables, kv.layout.group_windows):
                gone = released if group_window is not None else 0
                assert table[:gone] == [kv.released_block] * gone and kv.released_block not in table[gone:]
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
    assert draft.kv.window == WINDOW and llm.engine.speculator.stats.num_accepted > 0
    plain = LLM(str(tiny_phi3), dtype="float32", progress=False)
    assert out == plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("graphs", ["eager", pytest.param("captured", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("model", ["tiny_phi3", "tiny_gemma3"])
def test_cuda_graphs_read_past_given_back_blocks(model, graphs, request):
    """A CUDA graph's decode step gathers each row's whole padded context, given-back blocks'
    entries (the scratch block) included, and masks what the window hides: the same answers
    as the regular path. On the CPU the graphs' padded form runs eagerly; on a GPU they are
    captured. tiny_gemma3 has a slot column and a block table per group of layers."""
    from .test_cuda_graphs import PARAMS, assert_same, engine_pair

    device = "cuda" if graphs == "captured" else "cpu"
    plain, padded, steps = engine_pair(request.getfixturevalue(model), {}, graphs, device=device, max_loras=0,
                                       max_num_batched_tokens=256)
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
    assert_same(results[1], results[0], atol=1e-5 if device == "cpu" else 1e-4)
    assert steps, "no decode step took the graphs"


def test_a_hybrid_models_windowed_layers_give_back_their_blocks(tiny_gemma3):
    """tiny_gemma3's layers form three groups of one (engine/kv_layout.py): the full-attention
    one keeps every block, the two windowed ones about a window and a step's. 40 blocks hold a
    430-token context: 27 full-attention blocks and at most 4 + 4 windowed ones, where keeping
    every layer's K/V would take 81."""
    page = 2 * 16 * 2 * 32 * 4  # K and V x 1 layer x 16 tokens x 2 KV heads x head_dim 32 x fp32
    llm = LLM(str(tiny_gemma3), dtype="float32", progress=False, kv_cache_memory=40 * page, max_num_batched_tokens=32)
    kv = llm.engine.kv
    assert kv.layout.group_windows == (None, 12, 12) and kv.num_blocks == 40
    assert llm.engine.max_model_len == (40 - 2 * 4) * 16  # the full-attention group's share
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
    prompts = random_prompts([400], hf.config.vocab_size, seed=6)
    out = run_checking_the_cache(llm, prompts, 30, window=12)[0]
    assert out == hf_greedy(hf, prompts[0], 30)
    # A second request with the same prompt hits the whole cached prefix: every full-attention
    # block, and the windowed groups' last blocks (their earlier ones were given back, and
    # may be gone).
    again = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert again.num_cached_tokens == 399 // 16 * 16 and again.token_ids == out  # one token left to compute
