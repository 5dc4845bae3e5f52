"""Liveness under pressure: random arrivals from several tenants over more adapters than
slots, a KV cache that forces preemption, chunked prefill, aborts, prompts sharing prefixes
(some scored), with and without speculation. Every request must finish (none waits for good
with the engine idle), a scored prompt gets every position's logprob once, and nothing stays
pinned or allocated."""

from __future__ import annotations

import random

import pytest

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.arch import ModelArchConfig
from loragate.engine.models.loader import load_hf_config

from .test_lora_pool import random_weights

ARRIVAL_STEPS = 200


@pytest.mark.parametrize("seed", range(4))
def test_every_request_finishes_under_slot_and_cache_pressure(tiny_llama, seed):
    rng = random.Random(seed)
    arch = ModelArchConfig.from_hf(load_hf_config(tiny_llama))
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_lora_rank=8, max_loras=2,
                                    max_num_seqs=6, max_num_batched_tokens=32, kv_cache_memory="128KiB",
                                    speculative="ngram" if seed % 2 else "off"), progress=False)
    names = [f"x{i}" for i in range(5)]
    for i, name in enumerate(names):
        engine.add_adapter_weights(name, random_weights(arch, 4, seed=200 + i))
    prefixes = [[], [1] + [rng.randrange(3, 40) for _ in range(40)], [1] + [rng.randrange(3, 40) for _ in range(70)]]
    sent, active, prompts = {}, set(), {}  # request id -> arrival step; those not yet ended; scored prompts
    for step in range(20 * ARRIVAL_STEPS):
        if step < ARRIVAL_STEPS:
            if rng.random() < 0.6:  # more arrivals than the engine clears: queues build up
                rid = f"r{step}"
                prompt = (rng.choice(prefixes) or [1]) + [rng.randrange(3, 40) for _ in range(rng.randint(1, 60))]
                params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.8]),
                                        seed=step, ignore_eos=True, prompt_logprobs=rng.choice([None, None, 1, 2]))
                engine.add_request(prompt, params, request_id=rid, adapter=rng.choice([*names, None]),
                                   tenant=rng.choice(["t0", "t0", "t0", "t1", None]))  # t0 sends most
                sent[rid] = step
                active.add(rid)
                if params.prompt_logprobs is not None:
                    prompts[rid] = prompt
            if active and rng.random() < 0.03:
                rid = rng.choice(sorted(active))
                assert engine.abort(rid)
                active.discard(rid)
        for out in engine.step():
            if out.finished:
                active.discard(out.request_id)
                if out.request_id in prompts and out.finish_reason != "abort":
                    assert len(out.prompt_logprobs) == len(prompts[out.request_id]) - 1
        if step >= ARRIVAL_STEPS and not engine.has_unfinished:
            break
    waiting = sorted(active, key=sent.get)
    assert not waiting, f"{len(waiting)} requests never finished, first {waiting[:5]}"
    assert engine.scheduler.num_preemptions > 0  # the cache really was short
    assert engine.lora_pool.num_pinned == 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
