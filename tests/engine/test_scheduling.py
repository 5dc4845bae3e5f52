"""Continuous batching, prefix caching and preemption: the same tokens as running alone,
with every KV block accounted for at the end."""

from __future__ import annotations

import pytest
import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams


def make_engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **kw), progress=False)


def prompts_of(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_alone(model_dir, prompt, params):
    engine = make_engine(model_dir)
    engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    return outs[-1].token_ids


def drain(engine: LLMEngine, arrivals: dict[int, list] | None = None) -> dict[str, list[int]]:
    """Step until idle; `arrivals[step]` lists (prompt, params, id) added before that step."""
    arrivals = arrivals or {}
    final: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished or any(s >= step for s in arrivals):
        for prompt, params, rid in arrivals.get(step, []):
            engine.add_request(prompt, params, request_id=rid)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        step += 1
    return final


def assert_all_blocks_free(engine: LLMEngine):
    kv = engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert all(c == 0 for c in kv.ref_counts)


def test_staggered_arrivals_match_running_alone(tiny_llama):
    prompts = prompts_of([7, 30, 3, 90, 12, 50])
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 5, 33, 9, 14, 25)]
    # Two seeded sampled requests too: their draws must not depend on batch neighbours.
    params[1] = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    params[4] = SamplingParams(max_tokens=14, temperature=1.2, top_k=20, seed=3, ignore_eos=True)
    arrivals = {0: [(prompts[0], params[0], "a"), (prompts[1], params[1], "b")],
                3: [(prompts[2], params[2], "c")],
                4: [(prompts[3], params[3], "d")],
                11: [(prompts[4], params[4], "e")],
                12: [(prompts[5], params[5], "f")]}
    # A small token budget forces the 90-token prompt through chunked prefill next to decodes.
    engine = make_engine(tiny_llama, max_num_batched_tokens=32)
    final = drain(engine, arrivals)
    for i, rid in enumerate("abcdef"):
        assert final[rid] == run_alone(tiny_llama, prompts[i], params[i]), rid
        assert len(final[rid]) == params[i].max_tokens
    assert_all_blocks_free(engine)


def test_prefix_cache_computes_only_the_suffix(tiny_qwen2):
    prefix = prompts_of([300], seed=5)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = make_engine(tiny_qwen2)
    drain(engine, {0: [(first, params, "first")]})
    before = engine.num_computed_tokens_total
    out = drain(engine, {0: [(second, params, "second")]})["second"]
    computed = engine.num_computed_tokens_total - before
    cached = (len(prefix) // 16) * 16  # whole blocks of the shared prefix
    assert computed == len(second) - cached + params.max_tokens - 1
    assert engine.kv.num_prefix_hit_tokens == cached
    uncached = make_engine(tiny_qwen2, enable_prefix_caching=False)
    assert out == drain(uncached, {0: [(second, params, "second")]})["second"]
    assert_all_blocks_free(engine)


def test_requests_arriving_together_compute_a_shared_prefix_once(tiny_qwen2):
    """Eight requests with one 300-token prefix, all in one step's arrivals: the first
    computes the prefix (in chunks), the others wait for its blocks and take them from the
    cache instead of computing them seven more times; outputs are unchanged."""
    prefix = prompts_of([300], seed=6)[0]
    prompts = [prefix + suffix for suffix in prompts_of([3, 5, 8, 2, 6, 4, 7, 9], seed=7)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    arrivals = {0: [(p, params, f"r{i}") for i, p in enumerate(prompts)]}
    engine = make_engine(tiny_qwen2, max_num_batched_tokens=64)
    out = drain(engine, arrivals)
    cached = (len(prefix) // 16) * 16
    generated = len(prompts) * (params.max_tokens - 1)
    assert engine.num_computed_tokens_total == sum(len(p) for p in prompts) - 7 * cached + generated
    uncached = make_engine(tiny_qwen2, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert out == drain(uncached, arrivals)
    assert uncached.num_computed_tokens_total == sum(len(p) for p in prompts) + generated
    assert_all_blocks_free(engine)


def test_prefix_cache_eviction_reuses_oldest_free_blocks(tiny_qwen2):
    # 40 blocks of 16 tokens: a 300-token request fills ~20, so the third distinct prompt
    # must evict cached blocks of the first.
    engine = make_engine(tiny_qwen2, kv_cache_memory=40 * 16 * 2 * 2 * 2 * 16 * 4)
    assert engine.kv.num_blocks == 40
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    a, b, c = prompts_of([300, 300, 300], seed=9)
    for i, p in enumerate((a, b, c)):
        drain(engine, {0: [(p, params, f"p{i}")]})
    assert engine.kv.num_evictions > 0
    hits_before = engine.kv.num_prefix_hit_tokens
    drain(engine, {0: [(c, params, "again-c")]})  # most recent: still cached
    assert engine.kv.num_prefix_hit_tokens - hits_before == (299 // 16) * 16
    hits_before = engine.kv.num_prefix_hit_tokens
    out = drain(engine, {0: [(a, params, "again-a")]})["again-a"]  # oldest: mostly evicted
    assert engine.kv.num_prefix_hit_tokens - hits_before < (299 // 16) * 16
    assert out == drain(make_engine(tiny_qwen2), {0: [(a, params, "fresh")]})["fresh"]
    assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_kv_budget_keeps_outputs(tiny_llama):
    prompts = prompts_of([40, 60, 25, 70, 33, 55, 10, 45])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    roomy = make_engine(tiny_llama)
    expected = drain(roomy, {0: [(p, params, str(i)) for i, p in enumerate(prompts)]})
    # 24 blocks x 16 = 384 tokens of KV for ~620 tokens of demand.
    tight = make_engine(tiny_llama, kv_cache_memory=24 * 16 * 2 * 2 * 2 * 16 * 4)
    assert tight.kv.num_blocks == 24
    got = drain(tight, {0: [(p, params, str(i)) for i, p in enumerate(prompts)]})
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert_all_blocks_free(tight)
    assert_all_blocks_free(roomy)


@pytest.mark.parametrize("speculative", ["off", "ngram", "draft"])
def test_conversations_under_pressure_answer_alike_with_and_without_the_prefix_cache(tiny_llama, speculative):
    """Turns that go on from earlier answers (kept partial blocks copied, full blocks shared),
    arriving at random steps into a cache that preempts and evicts, with speculation rolling
    tokens back: the same tokens as a plain engine without prefix caching, and every block
    back at the end."""
    rng = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    size = 16 * 16 * 2 * 2 * 2 * 16 * 4  # 16 blocks: the last turn's six requests grow to about 50
    spec = {"speculative": speculative, **({"draft_model": str(tiny_llama)} if speculative == "draft" else {})}
    cached, plain = make_engine(tiny_llama, kv_cache_memory=size, **spec), \
        make_engine(tiny_llama, kv_cache_memory=size, enable_prefix_caching=False)
    histories = [(p * 3)[:n] for p, n in zip(prompts_of([5, 8, 10, 6, 9, 7], seed=3), [5, 17, 30, 9, 40, 23])]
    for turn in range(4):
        arrivals: dict[int, list] = {}
        for i, h in enumerate(histories):
            arrivals.setdefault(int(torch.randint(0, 3, (1,), generator=rng)), []).append((h, params, f"{turn}-{i}"))
        got, expected = drain(cached, arrivals), drain(plain, arrivals)
        assert got == expected
        more = prompts_of([1 + i % 4 for i in range(len(histories))], seed=10 + turn)
        histories = [h + got[f"{turn}-{i}"] + m for i, (h, m) in enumerate(zip(histories, more))]
    assert cached.kv.num_prefix_hit_tokens > 0 and cached.scheduler.num_preemptions > 0
    assert_all_blocks_free(cached)
