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
