"""Interactive requests behind long background work that fills the KV cache: equal priorities
vs the background at a less urgent priority (as batch lines run), side by side in one process.

    python bench/priority.py [--bulk 8] [--bulk-prompt 1200] [--bulk-tokens 160] [--kv-cache-memory 96MiB]
                             [--interactive 10] [--every 0.5]

SmolLM2-135M-Instruct bf16. One tenant's background script queues --bulk long requests at
once (a document each, summarised), more than the KV cache holds; from 0.5 s on, the same
tenant's app sends one short chat request every --every seconds. Within a tenant admission
is first come, first served, so with equal priorities an app request waits behind the whole
queue of background requests. With the background at priority 1 (as batch lines run), the
app's requests are admitted first, preempting a background request when the cache is full
(recomputed later, mostly from the prefix cache). (Another tenant's app would not wait:
tenants take turns; --tenants puts the app in a tenant of its own.) Prints the app's time to first token and latency, when
the bulk finished, its preemptions, and how many outputs are the same in both runs.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tenant_fairness import app_and_bulk, compare, timed_arrivals  # noqa: E402

from loragate.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def run(bulk_priority: int, bulk, app, every: float, kv: str, app_tenant: str):
    engine = LLMEngine(EngineConfig(kv_cache_memory=kv), progress=False)
    bulk = (bulk[0], [SamplingParams(**{**p.__dict__, "priority": bulk_priority}) for p in bulk[1]])
    first, done, tokens, _ = timed_arrivals(engine, bulk, app, every, "acme", app_tenant)
    return first, done, tokens, engine.scheduler.num_preemptions, engine.kv.num_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bulk", type=int, default=8, help="long requests queued at once")
    ap.add_argument("--bulk-prompt", type=int, default=1200, help="prompt tokens of each (about)")
    ap.add_argument("--bulk-tokens", type=int, default=160, help="output tokens of each")
    ap.add_argument("--kv-cache-memory", default="96MiB")
    ap.add_argument("--interactive", type=int, default=10, help="requests the app sends, one at a time")
    ap.add_argument("--app-tokens", type=int, default=16)
    ap.add_argument("--every", type=float, default=0.5, help="seconds between the app's requests")
    ap.add_argument("--tenants", action="store_true", help="the app is another tenant than the background script")
    args = ap.parse_args()
    tok = LLMEngine(EngineConfig(max_num_seqs=1, kv_cache_memory="16MiB"), progress=False).tokenizer

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)

    source = tok.encode(inspect.getsource(argparse))
    documents = [tok.decode(source[i * 211:i * 211 + args.bulk_prompt]) for i in range(args.bulk)]
    bulk = ([chat(f"Summarise this code:\n{d}") for d in documents],
            [SamplingParams(max_tokens=args.bulk_tokens, temperature=0, ignore_eos=True) for _ in documents])
    app = ([chat(f"What is {i} plus {i + 3}?") for i in range(args.interactive)],
           SamplingParams(max_tokens=args.app_tokens, temperature=0, ignore_eos=True))
    results = {}
    for bulk_priority in (0, 1):
        first, done, tokens, preemptions, blocks = results[bulk_priority] = run(
            bulk_priority, bulk, app, args.every, args.kv_cache_memory, "app" if args.tenants else "acme")
        if bulk_priority == 0:
            print(f"background: {args.bulk} requests of about {len(bulk[0][0])} prompt + {args.bulk_tokens} output "
                  f"tokens at once; app ({'another' if args.tenants else 'the same'} tenant): {args.interactive} chat "
                  f"requests, one every {args.every} s from 0.5 s, "
                  f"{args.app_tokens} tokens each; SmolLM2-135M bf16, KV cache {args.kv_cache_memory} ({blocks} "
                  f"blocks of 16 tokens)")
        ttft, ttft_max, e2e, bulk_end = app_and_bulk(first, done)
        label = "background at 1" if bulk_priority else "equal priorities"
        print(f"  {label:<19} app TTFT p50 {ttft:.2f} s, max {ttft_max:.2f} s; "
              f"app latency p50 {e2e:.2f} s; background done in {bulk_end:.2f} s; "
              f"{preemptions} preemptions")
    ttft, latency, bulk_time, same, total = compare(results[0], results[1])
    print(f"  priority vs equal: app TTFT p50 {ttft:.1f}x lower, app latency p50 {latency:.1f}x lower; the "
          f"background took {bulk_time:.2f}x as long; {same} of {total} outputs identical")


if __name__ == "__main__":
    main()
