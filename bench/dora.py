"""DoRA adapters: what the rescale costs in loragate's mixed batches, and peft beside it.

    python bench/dora.py [--requests 16] [--adapters 4] [--max-tokens 64] [--skip-peft] [--model NAME]

SmolLM2-135M-Instruct, bf16, N concurrent greedy requests spread over A DoRA adapters (rank
16 on every linear module, saved by peft with use_dora=True, random B and magnitudes). In
one process: loragate serving them as DoRA, loragate serving the same A and B as plain LoRA
(the rescale left out), and peft, which refuses mixed-adapter batches with DoRA, so it runs
one adapter's requests at a time (set_adapter + generate). Prints output tok/s and ratios,
and the time to compute an adapter's DoRA row scales (once per adapter and engine; the first
also takes each projection's row norms out of it, once per engine).

Then, on --model (default: the bundled one), a stream of base tokens runs while the engine's
first DoRA adapter comes into use, as the gateway brings it in: the largest gap between the
stream's tokens when the scales are computed in the step that loads the adapter into a slot
vs beforehand in a worker thread (LLMEngine.prepare_adapter_weights, what the gateway does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from multi_lora import TARGETS, make_adapters, prompts_for, run_engine  # noqa: E402

from loragate.adapters.loader import load_adapter  # noqa: E402
from loragate.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402


def peft_one_adapter_at_a_time(model_dir, dirs, prompts, adapters, max_tokens, tokenizer) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name="d0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"d{i}")
    model.eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
              pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for name in sorted(set(adapters)):
            rows = [i for i, a in enumerate(adapters) if a == name]
            model.set_adapter(name)
            model.generate(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), **kw)
        return len(prompts) * max_tokens / (time.perf_counter() - t0)


def largest_stream_gap(model_dir: Path, adapter_dir: Path, off_loop: bool, tokens: int = 160) -> float:
    """Seconds: the largest gap between a base stream's tokens while a DoRA adapter, new to
    the engine, is brought in after the stream's first 40 tokens and used by one request."""
    engine = AsyncEngine(EngineConfig(model=str(model_dir), max_loras=2, max_lora_rank=16), progress=False)
    weights = load_adapter(adapter_dir, engine.engine.model.config, 16)
    prompt = prompts_for(engine.tokenizer, 2)

    async def run() -> float:
        stamps = []
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        base = await engine.add_request(prompt[0], params)

        async def bring_adapter():
            while len(stamps) < 40:
                await asyncio.sleep(0.005)
            if off_loop:
                await asyncio.to_thread(engine.engine.prepare_adapter_weights, weights)
            engine.engine.add_adapter_weights("d", weights)
            async for _ in await engine.add_request(prompt[1], SamplingParams(max_tokens=8, temperature=0), adapter="d"):
                pass

        task = asyncio.create_task(bring_adapter())
        async for _ in base:
            stamps.append(time.perf_counter())
        await task
        return max(b - a for a, b in zip(stamps[20:], stamps[21:]))

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-peft", action="store_true", help="skip the (slow) peft baseline")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the model of the stream-gap measurement")
    args = ap.parse_args()
    model_dir, gap_model = resolve_model(DEFAULT_MODEL), resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="loragate-dora-"))
    dirs = make_adapters(model_dir, tmp, TARGETS["all"], args.adapters, use_dora=True)
    config = EngineConfig(model=str(model_dir), max_loras=args.adapters, max_lora_rank=16,
                          max_num_seqs=args.requests, enable_prefix_caching=False)
    dora, plain = LLMEngine(config, progress=False), LLMEngine(config, progress=False)
    scales_ms = []  # the first also takes ||W||^2 per row out of the projections, once per engine
    for i, d in enumerate(dirs):
        weights = load_adapter(d, dora.model.config, 16)
        t0 = time.perf_counter()
        dora.prepare_adapter_weights(weights)
        scales_ms.append((time.perf_counter() - t0) * 1e3)
        dora.add_adapter_weights(f"d{i}", weights)
        plain.add_adapter(f"d{i}", d)
        plain.adapters[f"d{i}"][1].magnitudes.clear()  # the same A and B, served as a plain LoRA
    prompts = prompts_for(dora.tokenizer, args.requests)
    adapters = [f"d{i % args.adapters}" for i in range(args.requests)]
    for engine in (dora, plain):
        run_engine(engine, prompts[:4], adapters[:4], 8)  # warm-up: loads every slot
    # Interleaved, best of three: both engines see the same machine state.
    t_dora = t_plain = 0.0
    for _ in range(3):
        t_dora = max(t_dora, run_engine(dora, prompts, adapters, args.max_tokens))
        t_plain = max(t_plain, run_engine(plain, prompts, adapters, args.max_tokens))
    print(f"{args.requests} requests over {args.adapters} adapters (rank 16, all linear modules), {args.max_tokens} "
          f"tokens each, SmolLM2-135M bf16")
    print(f"  loragate, DoRA                 {t_dora:7.1f} tok/s")
    print(f"  loragate, same A/B as LoRA     {t_plain:7.1f} tok/s   DoRA / LoRA {t_dora / t_plain:.3f}")
    if not args.skip_peft:
        peft = peft_one_adapter_at_a_time(model_dir, dirs, prompts, adapters, args.max_tokens, dora.tokenizer)
        print(f"  peft DoRA, one adapter at a time (no mixed batches with DoRA) {peft:7.1f} tok/s   "
              f"loragate / peft {t_dora / peft:.2f}x")
    print(f"  DoRA row scales, once per adapter and engine: {scales_ms[-1]:.1f} ms "
          f"({scales_ms[0]:.1f} ms for the engine's first DoRA adapter)")
    del dora, plain
    gap_dir = dirs[0] if gap_model == model_dir else make_adapters(gap_model, tmp / "gap", TARGETS["all"], 1,
                                                                   use_dora=True)[0]
    in_loop = largest_stream_gap(gap_model, gap_dir, off_loop=False)
    off_loop = largest_stream_gap(gap_model, gap_dir, off_loop=True)
    print(f"  {args.model}: largest gap in a running stream when the engine's first DoRA adapter comes in: "
          f"{in_loop * 1e3:.0f} ms with its scales computed in the loading step, {off_loop * 1e3:.0f} ms with "
          f"them computed beforehand in a worker thread (the gateway's way)")


if __name__ == "__main__":
    main()
