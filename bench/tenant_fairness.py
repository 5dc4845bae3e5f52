"""One tenant's burst next to another tenant's steady requests: FCFS vs tenant turns.

    python bench/tenant_fairness.py [--bulk 128] [--bulk-tokens 64] [--same-length] [--interactive 12] [--every 0.25]

SmolLM2-135M-Instruct bf16, default engine settings (32 running at most). Tenant "bulk" sends
N chat requests at once (a script, an eval), of 0.5x to 1.5x `--bulk-tokens` tokens (all
exactly that many with --same-length: then they finish, and free their seats, in waves);
from 0.5 s on, tenant "app" sends one short request every `--every` seconds, as a product's
users do. Runs the same arrivals twice in
one process, on fresh engines: with the scheduler's tenant turns (the default) and with plain
FCFS admission. Prints the app's time to first token and latency, the bulk tenant's
throughput and finish time, when the last request of all finished, and how many greedy outputs are identical (in bf16 a different
batch can part a greedy output; tests/engine/test_tenants.py checks fp32 tokens are equal).
"""

from __future__ import annotations

import argparse
import statistics
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams


def run(fair: bool, bulk, app, every: float, dtype: str):
    engine = LLMEngine(EngineConfig(dtype=dtype), progress=False)
    engine.scheduler.fair_tenants = fair
    return timed_arrivals(engine, bulk, app, every, "bulk", "app")


def timed_arrivals(engine, bulk, app, every: float, bulk_tenant: str, app_tenant: str):
    """The bulk requests (prompts, params) at once, then the app's prompts one every `every`
    seconds from 0.5 s, on the clock; returns each request's time to first token, latency and
    tokens, and when the last one finished."""
    arrivals = [(0.5 + i * every, f"app{i}", prompt) for i, prompt in enumerate(app[0])]
    t0 = time.perf_counter()
    sent = {f"bulk{i}": 0.0 for i in range(len(bulk[0]))}
    for i, (prompt, params) in enumerate(zip(*bulk)):
        engine.add_request(prompt, params, request_id=f"bulk{i}", tenant=bulk_tenant)
    first, done, tokens = {}, {}, {}
    while engine.has_unfinished or arrivals:
        now = time.perf_counter() - t0
        while arrivals and arrivals[0][0] <= now:
            at, rid, prompt = arrivals.pop(0)
            sent[rid] = at
            engine.add_request(prompt, app[1], request_id=rid, tenant=app_tenant)
        if not engine.has_unfinished:
            time.sleep(max(0.0, arrivals[0][0] - now))
            continue
        for out in engine.step():
            t = time.perf_counter() - t0
            first.setdefault(out.request_id, t - sent[out.request_id])
            if out.finished:
                done[out.request_id], tokens[out.request_id] = t - sent[out.request_id], out.token_ids
    return first, done, tokens, time.perf_counter() - t0


def app_and_bulk(first, done) -> tuple[float, float, float, float]:
    """One run's app TTFT p50 and max, app latency p50, and when its bulk work was done."""
    app_ttft = [first[k] for k in first if k.startswith("app")]
    return (statistics.median(app_ttft), max(app_ttft), statistics.median(done[k] for k in done if k.startswith("app")),
            max(done[k] for k in done if k.startswith("bulk")))


def compare(base, new) -> tuple[float, float, float, int, int]:
    """Two runs' (first, done, tokens, ...) side by side: how many times lower the app's TTFT
    p50 and latency p50 are in `new`, how long its bulk work took relative to `base`, and
    how many outputs are identical of how many."""
    (b_ttft, _, b_e2e, b_end), (n_ttft, _, n_e2e, n_end) = app_and_bulk(*base[:2]), app_and_bulk(*new[:2])
    b_tok, n_tok = base[2], new[2]
    return b_ttft / n_ttft, b_e2e / n_e2e, n_end / b_end, sum(b_tok[k] == n_tok[k] for k in b_tok), len(b_tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bulk", type=int, default=128, help="requests the bulk tenant sends at once")
    ap.add_argument("--bulk-tokens", type=int, default=64, help="the bulk requests' mean output length")
    ap.add_argument("--same-length", action="store_true", help="every bulk request generates --bulk-tokens")
    ap.add_argument("--interactive", type=int, default=12, help="requests the app tenant sends, one at a time")
    ap.add_argument("--app-tokens", type=int, default=16)
    ap.add_argument("--every", type=float, default=0.25, help="seconds between the app's requests")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    tok = LLMEngine(EngineConfig(max_num_seqs=1, kv_cache_memory="64MiB"), progress=False).tokenizer

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)

    bulk = ([chat(f"Summarise paragraph {i} of the report in one sentence.") for i in range(args.bulk)],
            [SamplingParams(max_tokens=args.bulk_tokens if args.same_length
                            else args.bulk_tokens // 2 + i * 37 % (args.bulk_tokens + 1),
                            temperature=0, ignore_eos=True) for i in range(args.bulk)])
    app = ([chat(f"What is {i} plus {i + 3}?") for i in range(args.interactive)],
           SamplingParams(max_tokens=args.app_tokens, temperature=0, ignore_eos=True))
    bulk_tokens = sum(p.max_tokens for p in bulk[1])
    print(f"tenant bulk: {args.bulk} requests at once, {bulk_tokens // args.bulk} tokens each on average; tenant app: "
          f"{args.interactive} requests, one every {args.every} s from 0.5 s, {args.app_tokens} tokens each; "
          f"SmolLM2-135M {args.dtype}, 32 running at most")
    results = {}
    for fair in (False, True):
        first, done, tokens, end = results[fair] = run(fair, bulk, app, args.every, args.dtype)
        ttft, ttft_max, e2e, bulk_end = app_and_bulk(first, done)
        label = "tenant turns" if fair else "FCFS"
        print(f"  {label:<13} app TTFT p50 {ttft:.2f} s, max {ttft_max:.2f} s; "
              f"app latency p50 {e2e:.2f} s; bulk done in {bulk_end:.2f} s "
              f"({bulk_tokens / bulk_end:.1f} tok/s); all done in {end:.2f} s")
    ttft, latency, bulk_time, same, total = compare(results[False], results[True])
    print(f"  turns vs FCFS: app TTFT p50 {ttft:.1f}x lower, app latency p50 {latency:.1f}x lower, "
          f"bulk throughput {1 / bulk_time:.2f}x; {same} of {total} outputs identical")


if __name__ == "__main__":
    main()
