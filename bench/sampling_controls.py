"""What penalties and structured output cost per token, side by side in one engine.

    python bench/sampling_controls.py [--requests 16] [--max-tokens 64] [--rounds 2]

SmolLM2-135M-Instruct bf16, N concurrent chat requests, every one running exactly
--max-tokens tokens so each mode decodes the same batch for the same number of steps:
plain greedy; with frequency, presence and repetition penalties and a logit_bias; with a JSON
schema whose one string field needs 2000 characters (so no answer completes early); and the
two together. Prints output tok/s per mode and its ratio to plain. Modes alternate over
--rounds rounds (this machine's memory bandwidth drifts over minutes); the best round counts.
"""

from __future__ import annotations

import argparse
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.structured_output import grammar_from_json_schema

TOPICS = ["Paris", "the ocean", "a robot", "tea", "mountains", "a violin", "winter", "the moon", "bees",
          "a library", "trains", "coffee", "a castle", "rain", "chess", "a lighthouse"]
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
             "required": ["text"], "additionalProperties": False}


def run(engine: LLMEngine, prompts, params: SamplingParams) -> float:
    for p in prompts:
        engine.add_request(p, params)
    tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished:
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    seconds = time.perf_counter() - t0
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


if __name__ == "__main__":
    main()
