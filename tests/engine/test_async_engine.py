"""AsyncEngine: concurrent streams, incremental outputs, client aborts free the KV cache."""

from __future__ import annotations

import asyncio

import pytest
import torch

from loragate.engine import AsyncEngine, EngineConfig, InvalidRequestError, LLM, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncEngine(EngineConfig(model=str(tiny_llama), dtype="float32"), progress=False)
    yield eng
    eng.shutdown()


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


async def collect(engine, prompt, params):
    outs = [o async for o in await engine.add_request(prompt, params)]
    return outs


def test_concurrent_streams_match_offline_generation(engine, tiny_llama):
    ps = prompts(8)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in ps))

    results = asyncio.run(main())
    offline = LLM(str(tiny_llama), dtype="float32", progress=False).generate(ps, params)
    for outs, ref in zip(results, offline):
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert [t for o in outs for t in o.new_token_ids] == ref.token_ids
        assert "".join(o.delta_text for o in outs) == ref.text
    kv = engine.engine.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_breaking_out_of_a_stream_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def main():
        streams = [await engine.add_request(p, params) for p in prompts(6, seed=1)]
        for s in streams:
            async for out in s:
                if len(out.token_ids) >= 3:
                    break
            await s.aclose()
        # The abort is processed by the loop thread; wait for it to settle.
        for _ in range(200):
            if not engine.engine.has_unfinished:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    kv = engine.engine.kv
    assert not engine.engine.has_unfinished
    assert kv.num_free_blocks == kv.num_blocks


def test_bad_request_raises_at_once_and_others_continue(engine):
    async def main():
        with pytest.raises(InvalidRequestError):
            await engine.add_request([], SamplingParams())
        return await collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))

    outs = asyncio.run(main())
    assert len(outs[-1].token_ids) == 4


def test_adapters_added_and_removed_while_streaming(engine, tiny_llama, tmp_path, save_lora):
    from loragate.engine import AdapterNotFoundError

    save_lora(tiny_llama, tmp_path / "ad", 1.0, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def main():
        base = await engine.add_request([5, 6, 7], params)
        first = await base.__anext__()
        version = await asyncio.to_thread(engine.add_adapter, "live", tmp_path / "ad")
        tuned = await collect(engine, [5, 6, 7], params)
        with_adapter = [o async for o in await engine.add_request([5, 6, 7], params, adapter="live")]
        rest = [o async for o in base]
        assert engine.remove_adapter("live")
        with pytest.raises(AdapterNotFoundError):
            await engine.add_request([5, 6, 7], params, adapter="live")
        return version, [first] + rest, tuned, with_adapter

    version, base_outs, plain, tuned = asyncio.run(main())
    assert version == 1
    assert base_outs[-1].token_ids == plain[-1].token_ids  # the base stream was unaffected
    assert tuned[-1].token_ids != plain[-1].token_ids
    assert engine.engine.lora_pool.num_pinned == 0


def test_a_stream_never_iterated_is_aborted_when_closed_or_dropped(engine):
    import gc
    import time

    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)

    async def main():
        closed = await engine.add_request([5, 6, 7], params)
        closed.close()
        dropped = await engine.add_request([8, 9], params)
        del dropped
        gc.collect()

    asyncio.run(main())
    inner = engine.engine
    for _ in range(100):
        if not inner.has_unfinished:
            break
        time.sleep(0.02)
    assert not inner.has_unfinished and inner.kv.num_free_blocks == inner.kv.num_blocks


def test_add_requests_queues_all_or_none(engine, tiny_llama):
    ps = prompts(5, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    other = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    async def main():
        with pytest.raises(InvalidRequestError):  # the fourth is bad: none of them may run
            await engine.add_requests([(p, params) for p in ps[:3]] + [([10**9], params)] + [(ps[3], params)])
        assert not engine.engine.has_unfinished and engine.num_waiting == 0
        streams = await engine.add_requests([(p, params) for p in ps[:4]] + [(ps[4], other)])
        return [[t async for o in s for t in o.new_token_ids] for s in streams]

    results = asyncio.run(main())
    offline = LLM(str(tiny_llama), dtype="float32", progress=False).generate(ps, [params] * 4 + [other])
    assert results == [r.token_ids for r in offline]
    kv = engine.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
