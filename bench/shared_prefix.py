"""Requests arriving together with one long shared prefix: computed once or by each.

    python bench/shared_prefix.py [--requests 16] [--prefix 512] [--max-tokens 32]

SmolLM2-135M-Instruct bf16, prefix caching on. N chat requests arrive in the same step, all
with the same long system prompt and their own short question (as a product's requests
do), greedy. Runs them twice in one process on fresh engines: with the scheduler's rule that
a waiting request whose next prompt block a running prefill is computing waits for it, and
without it (every request computes the prefix it shares). Prints mean and p50/max time to
first token, total time, the tokens each run computed, and how many outputs are identical
(in bf16 a prefix taken from the cache is not bitwise the one a request computes itself, so
greedy outputs may part; tests/engine/test_scheduling.py checks they match in fp32).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams


def run(share: bool, prompts, params, dtype: str) -> tuple[list[float], float, int, list[list[int]]]:
    engine = LLMEngine(EngineConfig(dtype=dtype), progress=False)
    engine.scheduler.share_prefills = share
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    while engine.has_unfinished:
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - t0)
    return ([first[r.request_id] for r in reqs], time.perf_counter() - t0, engine.num_computed_tokens_total,
            [r.output_token_ids for r in reqs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=512, help="system prompt tokens (about)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    tok = LLMEngine(EngineConfig(max_num_seqs=1, kv_cache_memory="64MiB"), progress=False).tokenizer
    import argparse as source

    system = tok.decode(tok.encode(inspect.getsource(source))[:args.prefix])
    questions = [f"Question {i}: what does line {10 * i + 3} of this code do?" for i in range(args.requests)]
    prompts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False) for q in questions]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    results = {share: run(share, prompts, params, args.dtype) for share in (False, True)}
    same = sum(a == b for a, b in zip(results[False][3], results[True][3]))
    print(f"{args.requests} requests arriving together, {len(prompts[0])}-token prompts sharing a "
          f"{args.prefix}-token system prompt, {args.max_tokens} tokens each, SmolLM2-135M {args.dtype}")
    for share, (ttft, total, computed, _) in results.items():
        label = "shared prefix computed once" if share else "each computes it"
        print(f"  {label:<28} TTFT mean {statistics.mean(ttft):.2f} s, p50 {statistics.median(ttft):.2f} s, "
              f"max {max(ttft):.2f} s; all done in {total:.2f} s; {computed} tokens computed")
    (t_off, total_off, _, _), (t_on, total_on, _, _) = results[False], results[True]
    print(f"  once / each: mean TTFT {statistics.mean(t_off) / statistics.mean(t_on):.2f}x lower, "
          f"total {total_off / total_on:.2f}x faster; {same} of {len(prompts)} outputs identical")


if __name__ == "__main__":
    main()
