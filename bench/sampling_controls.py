"""What penalties and structured output cost per token, side by side in one engine.

    python bench/sampling_controls.py [--requests 16] [--max-tokens 64] [--rounds 2]

SmolLM2-135M-Instruct bf16, N concurrent chat requests, every one running exactly
--max-tokens tokens so each mode decodes the same batch for the same number of steps:
plain greedy; with frequency, presence and repetition penalties and a logit_bias; with a JSON
schema whose one string field needs 2000 characters (so no answer completes early); and the
two together. Prints output tok/s per mode and its ratio to plain. Modes alternate over
--rounds rounds (this machine's memory bandwidth drifts over minutes); the best round counts.

Then jump-forward decoding: the same requests asking for a short person record (a schema
whose keys and punctuation the grammar forces), greedy, with the forced tokens verified as
proposals or (speculative=False) decoded one step each. The outputs are the same tokens
(checked), so tok/s compares directly.
"""

from __future__ import annotations

import argparse
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.structured_output import grammar_from_json_schema

TOPICS = ["Paris", "the ocean", "a robot", "tea", "mountains", "a violin", "winter", "the moon", "bees",
          "a library", "trains", "coffee", "a castle", "rain", "chess", "a lighthouse"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "occupation": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 24},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "occupation", "city", "hobbies"], "additionalProperties": False}
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
             "required": ["text"], "additionalProperties": False}


def generate(engine: LLMEngine, prompts, params: SamplingParams) -> tuple[list[list[int]], float, int]:
    """(each request's tokens, seconds, engine steps)."""
    reqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        steps += 1
    return [r.output_token_ids for r in reqs], time.perf_counter() - t0, steps


def run(engine: LLMEngine, prompts, params: SamplingParams) -> float:
    outputs, seconds, _ = generate(engine, prompts, params)
    tokens = sum(map(len, outputs))
    if tokens != len(prompts) * params.max_tokens:
        raise SystemExit(f"expected every request to run {params.max_tokens} tokens, got {tokens} in all")
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(enable_prefix_caching=False), progress=False)
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.requests)]
    penalties = dict(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.1, logit_bias={30: -5.0})
    grammar = grammar_from_json_schema(LONG_TEXT)
    modes = {
        "plain": SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
        "penalties + logit_bias": SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                                                 **penalties),
        "json_schema": SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=grammar),
        "json_schema + penalties": SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=grammar,
                                                  **penalties),
    }
    run(engine, prompts[:2], modes["json_schema"])  # warm-up: builds the grammar tokenizer once
    best = {name: 0.0 for name in modes}
    for _ in range(args.rounds):
        for name, params in modes.items():
            best[name] = max(best[name], run(engine, prompts, params))
    print(f"{args.requests} concurrent requests x {args.max_tokens} tokens, greedy, SmolLM2-135M bf16, "
          f"best of {args.rounds} rounds")
    for name, rate in best.items():
        print(f"  {name:<24} {rate:7.1f} tok/s   {rate / best['plain']:.3f} of plain")

    person = grammar_from_json_schema(PERSON)
    results = {}
    for _ in range(args.rounds):
        for jump in (False, True):
            outputs, seconds, steps = generate(engine, prompts, SamplingParams(max_tokens=160, temperature=0,
                                                                               grammar=person, speculative=jump))
            tokens = sum(map(len, outputs))
            if jump in results and results[jump][0] != outputs:
                raise SystemExit("a greedy run gave other tokens the second time")
            if jump not in results or tokens / seconds > results[jump][1]:
                results[jump] = (outputs, tokens / seconds, steps, tokens)
    if results[True][0] != results[False][0]:
        raise SystemExit("jump-forward changed the output")
    (_, off, off_steps, tokens), (_, on, on_steps, _) = results[False], results[True]
    print(f"person records (JSON schema), {tokens} tokens in all: jump-forward off {off:.1f} tok/s in {off_steps} "
          f"steps, on {on:.1f} tok/s in {on_steps} steps: {on / off:.2f}x")


if __name__ == "__main__":
    main()
