"""Tenants at the engine: they take turns at admission, and the prefix cache keeps them apart."""

from __future__ import annotations

from loragate.engine import EngineConfig, LLMEngine, SamplingParams

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def make_engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **kw), progress=False)


def admission_order(engine: LLMEngine) -> list[str]:
    """Request ids in the order they were first admitted (ties: the scheduler's order)."""
    order, outputs = [], {}
    while engine.has_unfinished:
        order += [r.request_id for r in engine.scheduler.running if r.request_id not in order]
        for out in engine.step():
            outputs[out.request_id] = out
        order += [r.request_id for r in engine.scheduler.running if r.request_id not in order]
    return order, outputs


def burst_then_one(engine: LLMEngine):
    """Tenant a queues eight requests; after a step, tenant b sends one."""
    for i in range(8):
        engine.add_request([5 + i, 6, 7], PARAMS, request_id=f"a{i}", tenant="a")
    engine.step()
    engine.add_request([9, 8, 7], PARAMS, request_id="b", tenant="b")


def test_a_tenants_burst_does_not_queue_ahead_of_another_tenants_request(tiny_llama):
    """Two seats: b takes the second seat that frees (the first goes to a's older request, a
    tie), not the ninth; FCFS (fair_tenants off) serves b last. The tokens are the same."""
    fair = make_engine(tiny_llama, max_num_seqs=2)
    burst_then_one(fair)
    order, outputs = admission_order(fair)
    assert order == ["a0", "a1", "a2", "b", "a3", "a4", "a5", "a6", "a7"]
    fcfs = make_engine(tiny_llama, max_num_seqs=2)
    fcfs.scheduler.fair_tenants = False
    burst_then_one(fcfs)
    fcfs_order, fcfs_outputs = admission_order(fcfs)
    assert fcfs_order == [f"a{i}" for i in range(8)] + ["b"]
    assert {k: o.token_ids for k, o in outputs.items()} == {k: o.token_ids for k, o in fcfs_outputs.items()}


def test_one_tenant_is_served_in_arrival_order(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=2)
    for i in range(5):
        engine.add_request([5 + i, 6, 7], PARAMS, request_id=f"r{i}", tenant="a")
    assert admission_order(engine)[0] == [f"r{i}" for i in range(5)]


def test_the_prefix_cache_keeps_tenants_apart(tiny_llama):
    engine = make_engine(tiny_llama)
    prompt = list(range(5, 45))  # two full 16-token blocks

    def cached(tenant):
        engine.add_request(prompt, PARAMS, tenant=tenant)
        _, outputs = admission_order(engine)
        return next(iter(outputs.values())).num_cached_tokens

    assert cached("a") == 0
    assert cached("b") == 0
    assert cached("a") == 32 and cached("b") == 32
    assert cached(None) == 0


def test_a_cache_salt_cannot_spell_an_adapters_key(tiny_llama, tmp_path, save_lora):
    """A base-model request salted "s|lora:a@1" must not share the prefix-cache entries of
    adapter a's requests salted "s" (their KV differs): the salt is quoted in the key."""
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", save_lora(tiny_llama, tmp_path / "a", 0.3, seed=0, r=4, target_modules=["q_proj"]))
    base = engine.make_request([5, 6, 7], PARAMS, cache_salt="s|lora:a@1", tenant="t")
    adapted = engine.make_request([5, 6, 7], PARAMS, cache_salt="s", adapter="a", tenant="t")
    assert adapted.lora_key == "a@1" and base.cache_salt != adapted.cache_salt
    assert engine.make_request([5], PARAMS, cache_salt="s", tenant="t").cache_salt == \
        engine.make_request([6], PARAMS, cache_salt="s", tenant="t").cache_salt  # the same salt shares


def test_a_short_cache_preempts_the_heaviest_tenants_request(tiny_llama):
    """24 KV blocks for four 40-token prompts growing by 60 tokens each: preemptions are
    needed. Tenant a's three requests give them up; b's request, admitted last (plain LIFO's
    victim each time), is never preempted. Tokens are those of a roomy cache."""
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompts = {rid: [5 + n] + list(range(10, 49)) for n, rid in enumerate(["a0", "a1", "a2", "b"])}

    def run(engine):
        for rid, prompt in prompts.items():
            engine.add_request(prompt, params, request_id=rid, tenant=rid[0])
            if rid == "a2":
                engine.step()  # b comes after a's three are running
        requests = dict(engine.scheduler.requests)
        _, outputs = admission_order(engine)
        return {rid: r.num_preemptions for rid, r in requests.items()}, {k: o.token_ids for k, o in outputs.items()}

    tight = make_engine(tiny_llama, kv_cache_memory=24 * 16 * 2 * 2 * 2 * 16 * 4, enable_prefix_caching=False)
    assert tight.kv.num_blocks == 24
    preemptions, tokens = run(tight)
    assert preemptions["b"] == 0 and sum(preemptions.values()) > 0, preemptions
    assert tokens == run(make_engine(tiny_llama))[1]
