"""Scoring prompts (what eval harnesses do) with and without reuse of scored prefixes.

    python bench/scoring.py [--questions 24] [--choices 4] [--context 320] [--clients 4]

SmolLM2-135M-Instruct bf16. A multiple-choice eval's requests as lm-evaluation-harness's
`local-completions` sends them: for each question, context + one choice, echo with logprobs
(here: prompt_logprobs=1, max_tokens=1), question after question, from N closed-loop
clients. Runs the same requests on an engine with prefix caching (scored blocks reused with
their kept logprobs) and one without, in one process, and prints scored prompt tokens/s for
both, the ratio, the prompt tokens served from the cache, and how far the two runs' logprobs
and per-question picks differ (bf16: a recomputed block and a reused one are not bitwise
equal).
"""

from __future__ import annotations

import argparse
import inspect
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams


def workload(tokenizer, questions: int, choices: int, context: int) -> list[tuple[int, list[int]]]:
    import argparse as source

    ids = tokenizer.encode(inspect.getsource(source))
    out = []
    for q in range(questions):
        start = 1000 + q * 997 % (len(ids) - context - 200)
        ctx = ids[start:start + context]
        for c in range(choices):
            ending = ids[start + context + 37 * c:][: 3 + 2 * c]
            out.append((q, ctx + ending))
    return out


def run(engine: LLMEngine, requests, clients: int) -> tuple[float, list[list[float]]]:
    """Closed loop: `clients` requests open at a time, in order. (seconds, each request's logprobs)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    queue, open_reqs, results = list(enumerate(requests)), {}, {}
    t0 = time.perf_counter()
    while queue or open_reqs:
        while queue and len(open_reqs) < clients:
            i, (_, prompt) = queue.pop(0)
            open_reqs[engine.add_request(prompt, params).request_id] = i
        for out in engine.step():
            if out.finished:
                results[open_reqs.pop(out.request_id)] = [lp for lp, _, _ in out.prompt_logprobs]
    return time.perf_counter() - t0, [results[i] for i in range(len(requests))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context", type=int, default=320, help="context tokens per question")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="float32: the two runs' logprobs agree to about 1e-5")
    args = ap.parse_args()
    engines = {cache: LLMEngine(EngineConfig(enable_prefix_caching=cache, dtype=args.dtype), progress=False)
               for cache in (False, True)}
    requests = workload(engines[True].tokenizer, args.questions, args.choices, args.context)
    tokens = sum(len(p) for _, p in requests)
    run(engines[True], requests[:1], 1)  # warm-up (it also caches one context: re-seed the cache below)
    engines[True].kv.prompt_logprobs_by_hash.clear()
    engines[True].kv.cached_block_by_hash.clear()
    engines[True].kv.hash_of_block.clear()
    results = {}
    for cache, engine in engines.items():
        hits_before = engine.kv.num_prefix_hit_tokens
        seconds, logprobs = run(engine, requests, args.clients)
        results[cache] = (seconds, logprobs, engine.kv.num_prefix_hit_tokens - hits_before)
    (off, lp_off, _), (on, lp_on, hits) = results[False], results[True]
    diffs = [abs(a - b) for x, y in zip(lp_off, lp_on) for a, b in zip(x, y)]

    def picks(lps):
        per_q: dict[int, list[float]] = {}
        for (q, prompt), lp in zip(requests, lps):
            ending = len(prompt) - args.context
            per_q.setdefault(q, []).append(sum(lp[-ending:]) / ending)
        return [max(range(len(v)), key=v.__getitem__) for v in per_q.values()]

    same = sum(a == b for a, b in zip(picks(lp_off), picks(lp_on)))
    print(f"{len(requests)} scored prompts ({args.questions} questions x {args.choices} choices, {args.context}-token "
          f"contexts), {args.clients} clients, {tokens} prompt tokens, SmolLM2-135M {args.dtype}")
    print(f"  without reuse {tokens / off:8.1f} prompt tok/s ({off:.1f} s)")
    print(f"  with reuse    {tokens / on:8.1f} prompt tok/s ({on:.1f} s), {hits} tokens from the cache "
          f"({hits / tokens:.0%})")
    print(f"  reuse / none: {off / on:.2f}x; logprob difference largest {max(diffs):.2g}, mean "
          f"{sum(diffs) / len(diffs):.2g}; same pick on {same} of {args.questions} questions")


if __name__ == "__main__":
    main()
