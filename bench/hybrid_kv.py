"""Windowed layers giving back their KV blocks (engine/kv_layout.py) vs every layer keeping
every position, side by side in one process, on the same KV budget.

    python bench/hybrid_kv.py [--model gemma-3-270m] [--requests 8] [--prompt-tokens 2048]
                              [--max-tokens 128] [--kv-cache-memory 64MiB] [--dtype bfloat16]

Gemma 3 270M attends over a 512-token window in 15 of its 18 layers. N requests with distinct
random prompts (no prefix to share) arrive together, greedy, bf16 (or --dtype float32, where
the two engines' outputs should be the same tokens: in bf16 a step's batch shape decides the
rounding, and the two engines batch differently, so near-ties may part). The engine where only the
3 full-attention layers keep a request's whole context fits more of them in the cache at
once, so fewer wait or get preempted. The baseline is the same engine with the cache laid out
as before: one group of every layer (what engines without a hybrid allocator do). Prints per
engine the most requests running at once, preemptions, wall time and tokens per second
(prompt + output), and the ratios.
"""

from __future__ import annotations

import argparse
import random
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine import llm_engine
from loragate.engine.kv_layout import kv_layout


def every_layer_keeps_everything(layer_windows, num_layers, max_model_len):
    return kv_layout((), num_layers, max_model_len)


def run(engine: LLMEngine, prompts, max_tokens: int) -> tuple[float, int, int, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    most = 0
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        most = max(most, len(engine.scheduler.running))
    seconds = time.perf_counter() - t0
    return seconds, most, sum(r.num_preemptions for r in reqs), [r.output_token_ids for r in reqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-memory", default="64MiB")
    ap.add_argument("--dtype", default="bfloat16", help="float32: the outputs should be the same tokens")
    args = ap.parse_args()
    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory)
    rng = random.Random(0)
    results = {}
    for name in ("every layer keeps every position", "windowed layers give back"):
        if name.startswith("every"):
            real, llm_engine.kv_layout = llm_engine.kv_layout, every_layer_keeps_everything
        try:
            engine = LLMEngine(config)
        finally:
            if name.startswith("every"):
                llm_engine.kv_layout = real
        vocab = engine.model.config.vocab_size
        if not results:
            prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(args.prompt_tokens)]
                       for _ in range(args.requests)]
        run(engine, [prompts[0][:64]], 4)  # warm-up
        seconds, most, preempted, outputs = run(engine, prompts, args.max_tokens)
        tokens = args.requests * (args.prompt_tokens + args.max_tokens)
        results[name] = (seconds, outputs)
        print(f"{name:34s}: {engine.kv.num_blocks} blocks in {engine.kv.layout.num_groups} group(s); "
              f"at most {most} of {args.requests} running, {preempted} preemptions, {seconds:.1f} s, "
              f"{tokens / seconds:.0f} tok/s", flush=True)
        del engine
    (base, base_out), (hybrid, hybrid_out) = results.values()
    same = sum(a == b for a, b in zip(base_out, hybrid_out))
    print(f"windowed layers giving back vs keeping everything: {base / hybrid:.2f}x the throughput; "
          f"{same} of {args.requests} outputs the same tokens")


if __name__ == "__main__":
    main()
