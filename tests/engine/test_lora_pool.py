"""The adapter slot pool: LRU, pinning, many adapters through few slots, replacement."""

from __future__ import annotations

import random

import pytest
import torch
from loragate.adapters.loader import LoraWeights, module_shapes
from loragate.adapters.pool import LoraSlotPool
from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.arch import ModelArchConfig
from loragate.engine.models.loader import load_hf_config


def random_weights(arch, rank, seed, modules=("q_proj", "v_proj", "o_proj", "down_proj")) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(arch)
    return LoraWeights(rank=rank, config=None, modules={
        (layer, m): (torch.randn(rank, shapes[m][0], generator=g) * 0.3, torch.randn(shapes[m][1], rank, generator=g) * 0.3)
        for layer in range(arch.num_layers) for m in modules})


@pytest.fixture(scope="module")
def arch(tiny_llama):
    return ModelArchConfig.from_hf(load_hf_config(tiny_llama))


def test_lru_eviction_and_pinning(arch):
    pool = LoraSlotPool(arch, num_slots=2, max_rank=8, dtype=torch.float32)
    w = {k: random_weights(arch, 4, i) for i, k in enumerate("abc")}
    sa = pool.acquire("a", lambda: w["a"])
    sb = pool.acquire("b", lambda: w["b"])
    assert pool.acquire("c", lambda: w["c"]) is None  # both pinned: wait, never evict a pinned slot
    pool.release(sa)
    pool.release(sb)
    assert pool.acquire("a", lambda: w["a"]) == sa  # hit; now "b" is least recently used
    pool.release(sa)
    assert pool.acquire("c", lambda: w["c"]) == sb  # evicts b, not a
    assert pool.stats.evictions == 1 and pool.stats.hits == 1 and pool.stats.misses == 3
    layer0_q = pool.a["q_proj"][0, sb, :4]
    torch.testing.assert_close(layer0_q, w["c"].modules[(0, "q_proj")][0])
    assert torch.all(pool.a["q_proj"][0, sb, 4:] == 0)  # rank padding stays zero
    with pytest.raises(RuntimeError):
        pool.release(sa)  # "a" was released already
    assert pool.stats.store_loads == 3  # a, b and c read once each
    assert pool.acquire("b", lambda: pytest.fail("b is in host memory")) == sa  # evicts a; b from the host cache
    assert (pool.stats.misses, pool.stats.store_loads) == (4, 3)


def run(engine):
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_twenty_adapters_through_four_slots(tiny_llama, arch):
    weights = {f"ad{i}": random_weights(arch, rng_rank, seed=i) for i, rng_rank in
               zip(range(20), [4, 8, 16, 64] * 5)}
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_loras=4, max_lora_rank=64,
                                    max_cpu_loras=6), progress=False)
    for name, w in weights.items():
        engine.add_adapter_weights(name, w)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    jobs = [(f"r{i}", [rng.randrange(3, 500) for _ in range(rng.randint(2, 30))],
             rng.choice(list(weights) + [None])) for i in range(48)]
    for rid, prompt, adapter in jobs:
        engine.add_request(prompt, params, request_id=rid, adapter=adapter)
    seen_pins = []
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        pool = engine.lora_pool
        running_slots = {r.lora_slot for r in engine.scheduler.running if r.lora_slot >= 0}
        assert all(pool.pins[s] > 0 for s in running_slots)  # a running request's slot is pinned
        seen_pins.append(pool.num_pinned)
    assert len(done) == len(jobs)  # no deadlock: everything finished
    assert engine.lora_pool.num_pinned == 0 and max(seen_pins) <= 4
    assert engine.lora_pool.stats.evictions > 0
    alone = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_loras=1, max_lora_rank=64),
                      progress=False)
    for name, w in weights.items():
        alone.add_adapter_weights(name, w)
    for rid, prompt, adapter in jobs[:16]:
        alone.add_request(prompt, params, request_id=rid, adapter=adapter)
        assert run(alone)[rid] == done[rid], f"{rid} on {adapter}"


def test_replacing_an_adapter_during_traffic(tiny_llama, arch):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_loras=2), progress=False)
    v1, v2 = random_weights(arch, 8, seed=1), random_weights(arch, 8, seed=2)
    prompt = list(range(10, 60))  # 50 tokens: three full blocks to cache
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def alone(w):
        e = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_loras=1), progress=False)
        e.add_adapter_weights("x", w)
        e.add_request(prompt, params, request_id="solo", adapter="x")
        return run(e)["solo"]

    assert engine.add_adapter_weights("x", v1) == 1
    engine.add_request(prompt, params, request_id="old", adapter="x")
    done = {}
    for _ in range(4):  # "old" is mid-generation
        for out in engine.step():
            done[out.request_id] = out.token_ids
    assert engine.add_adapter_weights("x", v2) == 2
    hits_before = engine.kv.num_prefix_hit_tokens
    engine.add_request(prompt, params, request_id="new", adapter="x")
    done.update(run(engine))
    assert engine.kv.num_prefix_hit_tokens == hits_before  # v1's cached blocks are not v2's
    assert done["old"] == alone(v1)
    assert done["new"] == alone(v2)
    assert done["old"] != done["new"]
    assert engine.lora_pool.num_pinned == 0


def test_reused_slot_keeps_nothing_of_its_previous_adapter(arch):
    pool = LoraSlotPool(arch, num_slots=1, max_rank=16, dtype=torch.float32)
    big = random_weights(arch, 16, seed=5, modules=("q_proj", "gate_proj", "down_proj"))
    small = random_weights(arch, 4, seed=6, modules=("q_proj", "v_proj"))
    del small.modules[(1, "v_proj")]  # like layers_to_transform: v_proj only in layer 0
    pool.release(pool.acquire("big", lambda: big))
    slot = pool.acquire("small", lambda: small)
    for name in ("gate_proj", "down_proj", "k_proj"):
        assert torch.all(pool.a[name][:, slot] == 0) and torch.all(pool.b[name][:, slot] == 0), name
    assert torch.all(pool.a["q_proj"][:, slot, 4:] == 0) and torch.all(pool.b["q_proj"][:, slot, :, 4:] == 0)
    assert torch.all(pool.a["v_proj"][1, slot] == 0)
    for (layer, name), (a, b) in small.modules.items():
        torch.testing.assert_close(pool.a[name][layer, slot, :4], a)
        torch.testing.assert_close(pool.b[name][layer, slot, :, :4], b)


def adapter_engine(tiny_llama, arch, names, **kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_lora_rank=8, **kw), progress=False)
    for i, name in enumerate(names):
        engine.add_adapter_weights(name, random_weights(arch, 4, seed=100 + i))
    return engine


def test_waiting_requests_on_loaded_adapters_go_first(tiny_llama, arch):
    """A queue [c, a, b] with a and b in slots: a and b run without loading anything, and c
    loads only when it gets its turn (FCFS would load c first, evicting a, then reload a)."""
    engine = adapter_engine(tiny_llama, arch, "abc", max_loras=2, max_num_seqs=2)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for name in "ab":
        engine.add_request([1, 5, 6], params, adapter=name)
    run(engine)
    misses = engine.lora_pool.stats.misses
    for i, name in enumerate("cab"):
        engine.add_request([1, 7, 8 + i], params, request_id=f"q{name}", adapter=name)
    order = list(run(engine))
    assert order[-1] == "qc" and engine.lora_pool.stats.misses == misses + 1


def test_a_request_that_needs_a_load_is_passed_over_a_bounded_number_of_times(tiny_llama, arch):
    from loragate.engine.scheduler import MAX_PASSED_OVER

    engine = adapter_engine(tiny_llama, arch, "ac", max_loras=2, max_num_seqs=1)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request([1, 5], params, adapter="a")
    run(engine)
    engine.add_request([1, 9], params, request_id="c", adapter="c")
    for i in range(3 * MAX_PASSED_OVER):
        engine.add_request([1, 10 + i], params, request_id=f"a{i}", adapter="a")
    order = list(run(engine))
    assert order.index("c") == MAX_PASSED_OVER and len(order) == 3 * MAX_PASSED_OVER + 1


def test_a_steady_stream_on_the_loaded_adapter_does_not_starve_another(tiny_llama, arch):
    """One slot, adapter a always has a request running (each new one admitted before the last
    finishes): its slot never unpins by itself. c, passed over too often, gets the slot
    drained for it and runs within a bounded number of steps; then a's stream goes on."""
    from loragate.engine.scheduler import MAX_PASSED_OVER

    engine = adapter_engine(tiny_llama, arch, "ac", max_loras=1, max_num_seqs=4)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request([1, 5], params, request_id="a-first", adapter="a")
    engine.step()
    engine.add_request([1, 9], params, request_id="c", adapter="c")
    finished, c_step = [], None
    for step in range(1, 80):
        engine.add_request([1, 10 + step], params, request_id=f"a{step}", adapter="a")
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                if out.request_id == "c":
                    c_step = step
    assert c_step is not None and c_step <= MAX_PASSED_OVER + 3 * params.max_tokens, c_step
    assert any(r.startswith("a") for r in finished[finished.index("c") + 1:])  # a resumes after


def test_the_drained_adapters_own_requests_are_not_locked_out(tiny_llama, arch):
    """Two slots held by steady streams of a and b; c and d starve, so a is drained and c
    takes its slot. a's requests queued meanwhile are passed over while b keeps running, so
    they starve in turn: they must get a slot like any starving request, not stay shut out by
    a drain that already did its job (that left the engine idle with a's requests waiting
    for good: a 504 in bench/router.py with a uniform mix)."""
    engine = adapter_engine(tiny_llama, arch, "abcd", max_loras=2, max_num_seqs=8)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    sent, finished = set(), set()
    for step in range(400):
        if step < 120:  # steady streams on a and b
            for name in "ab":
                sent.add(f"{name}{step}")
                engine.add_request([1, 10 + step % 50], params, request_id=f"{name}{step}", adapter=name)
        if step == 2:  # two starving at once: the drain of a outlives its first use
            for name in "cd":
                sent.add(name)
                engine.add_request([1, 9], params, request_id=name, adapter=name)
        finished.update(out.request_id for out in engine.step() if out.finished)
        if not engine.has_unfinished:
            break
    assert finished == sent, sorted(sent - finished)[:5]
