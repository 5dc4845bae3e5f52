"""CUDA graphs vs eager steps on a GPU, with and without n-gram speculation, in one run.

    python bench/cuda_graphs.py [--model smollm2-135m-instruct] [--max-tokens 128]

For 1 and 16 concurrent greedy requests (64-token prompts, outputs ignore EOS), on fresh
engines: output tok/s (best of the second and third rounds: the first captures the graphs),
milliseconds per engine step, and tokens per request and step (above 1 with speculation).
Needs a CUDA GPU: graphs exist only there.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

CONFIGS = {"plain, graphs": {}, "ngram, graphs": {"speculative": "ngram"},
           "ngram, eager": {"speculative": "ngram", "cuda_graphs": False}, "plain, eager": {"cuda_graphs": False}}


def measure(model_dir, num_requests: int, max_tokens: int, **config) -> tuple[float, float, float]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", **config), progress=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    best, ms_per_step, tokens_per_step = 0.0, 0.0, 0.0
    for round_no in range(3):
        reqs = [engine.add_request(list(range(100 + 50 * i, 164 + 50 * i)), params) for i in range(num_requests)]
        torch.cuda.synchronize()
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.output_token_ids) for r in reqs)
        if round_no and tokens / seconds > best:
            best, ms_per_step, tokens_per_step = tokens / seconds, seconds / steps * 1e3, tokens / steps / num_requests
    return best, ms_per_step, tokens_per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_graphs.py needs a CUDA GPU: torch sees none")
    model_dir = resolve_model(args.model)
    for n in (1, 16):
        for name, config in CONFIGS.items():
            tps, ms, per = measure(model_dir, n, args.max_tokens, **config)
            print(f"{n:2d} requests, {name:14s}: {tps:7.1f} tok/s, {ms:5.2f} ms/step, "
                  f"{per:.2f} tokens per request and step", flush=True)


if __name__ == "__main__":
    main()
