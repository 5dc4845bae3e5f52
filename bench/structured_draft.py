"""Structured output under draft-model speculation: drafting within the grammar vs without.

    python bench/structured_draft.py [--target qwen2.5-coder-1.5b-instruct]
                                     [--draft qwen2.5-coder-0.5b-instruct] [--max-tokens 160]
                                     [--concurrent 1,4]

Four chat requests ask for a JSON description of a small software library, constrained by a
JSON schema (name, language enum, description, a list of functions with their arguments);
greedy, bf16, Qwen2.5-Coder-1.5B-Instruct with the 0.5B as draft (6 tokens at most). On one
engine, side by side: speculation off (grammar-forced tokens still jump forward); the draft
blind to the grammar (as the engine was before: a proposal is verified whole, and forced
tokens are proposed only where the draft proposed nothing); the draft still blind, but each
proposal cut before the first token the grammar refuses (often all of it, so forced tokens
take its place); and the draft drafting under each request's grammar mask, with the cut.
Batch 1 (one request at a time), then all four in flight. Every mode must produce the same
tokens (checked). Prints tok/s, engine steps and the draft's acceptance, with ratios.
"""

from __future__ import annotations

import argparse
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.structured_output import grammar_from_json_schema

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32},
    "language": {"type": "string", "enum": ["python", "rust", "go", "c"]},
    "description": {"type": "string", "maxLength": 200},
    "functions": {"type": "array", "maxItems": 4, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "args": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "args"], "additionalProperties": False}}},
    "required": ["name", "language", "description", "functions"], "additionalProperties": False}
QUESTIONS = ["Describe a small python library for parsing CSV files, as JSON.",
             "Describe a rust crate that computes checksums, as JSON.",
             "Describe a go package for an HTTP rate limiter, as JSON.",
             "Describe a c library for ring buffers, as JSON."]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, concurrent: int):
    """(tokens per request, seconds, engine steps), `concurrent` requests in flight at a time."""
    outputs, steps, seconds = [], 0, 0.0
    for start in range(0, len(prompts), concurrent):
        reqs = [engine.add_request(p, params) for p in prompts[start:start + concurrent]]
        t0 = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
            steps += 1
        seconds += time.perf_counter() - t0
        outputs += [r.output_token_ids for r in reqs]
    return outputs, seconds, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--concurrent", default="1,4", help="requests in flight, comma-separated (default: %(default)s)")
    args = ap.parse_args()
    engines = {"off": LLMEngine(EngineConfig(model=args.target, max_loras=0, kv_cache_memory="2GiB"), progress=False),
               "draft": LLMEngine(EngineConfig(model=args.target, max_loras=0, kv_cache_memory="2GiB",
                                               speculative="draft", draft_model=args.draft, num_speculative_tokens=6),
                                  progress=False)}
    tok = engines["off"].tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=grammar_from_json_schema(SCHEMA))
    for engine in engines.values():  # warm-up: native kernels, the grammar tokenizer, first allocations
        run(engine, prompts[:1], SamplingParams(max_tokens=8, temperature=0, grammar=params.grammar), 1)
    speculator = engines["draft"].speculator
    modes = {"off": ("off", None, None), "draft, grammar-blind": ("draft", False, False),
             "draft, blind, cut": ("draft", False, True), "draft within grammar": ("draft", True, True)}
    print(f"{len(prompts)} JSON-schema requests, greedy, at most {args.max_tokens} tokens, target {args.target}, "
          f"draft {args.draft}, bf16")
    for concurrent in (int(c) for c in args.concurrent.split(",")):
        results = {}
        for name, (engine_name, within, cut) in modes.items():
            if within is not None:
                speculator.proposer.within_grammar, speculator.cut_at_grammar = within, cut
                speculator.stats.__init__()
            outs, seconds, steps = run(engines[engine_name], prompts, params, concurrent)
            tokens = sum(len(o) for o in outs)
            stats = speculator.stats if within is not None else None
            results[name] = (outs, tokens / seconds, steps)
            accept = (f"   acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens per "
                      "verification" if stats else "")
            print(f"  {concurrent} in flight, {name:<21} {tokens / seconds:6.2f} tok/s  {steps:4d} steps{accept}",
                  flush=True)
        same = all(r[0] == results["off"][0] for r in results.values())
        base, blind, cut, within = (results[m][1] for m in modes)
        print(f"  {concurrent} in flight: within grammar / grammar-blind {within / blind:.2f}x (cut alone "
              f"{cut / blind:.2f}x), / off {within / base:.2f}x; same tokens in every mode: {same}")
        if not same:
            raise SystemExit("outputs differ between modes: speculation must be lossless")


if __name__ == "__main__":
    main()
