"""Decode steps with the decoder layers in one native call vs the Python path that calls the
same kernels one at a time (kernels/decoder_layers.py), side by side in one process.

    python bench/decoder_layers.py [--batches 1,8,32] [--max-tokens 64] [--repeats 3]

SmolLM2-135M-Instruct bf16 on CPU, greedy requests of 64-token prompts; a batch of 8 or more
uses 8 rank-16 q,k,v,o adapters (peft-made, random). Both paths give the same tokens (checked
here too); prints decode tok/s of each and the ratio, best of --repeats, run alternately so both
see the same machine state. Prefill is left out of the timing (it takes the Python path).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from multi_lora import make_adapters, prompts_for  # noqa: E402

from loragate.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402
from loragate.kernels import decoder_layers  # noqa: E402


def decode(engine: LLMEngine, prompts, adapters, max_tokens: int, fused: bool) -> tuple[float, list]:
    """Decode tok/s after the prefill step(s), and the tokens."""
    decoder_layers.enabled = fused
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, adapters)]
    while any(not r.output_token_ids for r in reqs):  # the prefills
        engine.step()
    done = sum(len(r.output_token_ids) for r in reqs)
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return (len(reqs) * max_tokens - done) / (time.perf_counter() - t0), [r.output_token_ids for r in reqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated request counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model_dir = resolve_model(DEFAULT_MODEL)
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", max_loras=8, max_lora_rank=16,
                                    max_num_seqs=max(batches), enable_prefix_caching=False), progress=False)
    if not decoder_layers.FusedLayers(engine.model).ok:
        sys.exit("this model or CPU cannot run the layers in one call (needs the native kernels, bf16, and "
                 "AMX or AVX-512 BF16)")
    for i, d in enumerate(make_adapters(model_dir, Path(tempfile.mkdtemp(prefix="loragate-bench-")),
                                        ["q_proj", "k_proj", "v_proj", "o_proj"], 8)):
        engine.add_adapter(f"a{i}", d)
    all_prompts = prompts_for(engine.tokenizer, max(batches))
    decode(engine, all_prompts[:2], [None, "a0"], 4, True)  # warm-up (builds the layers' structs)
    print(f"decode tok/s, {model_dir.name} bf16, {args.max_tokens} tokens per request, best of {args.repeats}")
    for n in batches:
        adapters = [None] * n if n < 8 else [f"a{i % 8}" for i in range(n)]
        best = {True: 0.0, False: 0.0}
        tokens = {}
        for _ in range(args.repeats):
            for fused in (True, False):
                tps, tokens[fused] = decode(engine, all_prompts[:n], adapters, args.max_tokens, fused)
                best[fused] = max(best[fused], tps)
        same = "same tokens" if tokens[True] == tokens[False] else "TOKENS DIFFER"
        what = "base model" if n < 8 else "8 adapters"
        print(f"batch {n:3d} ({what}): one call {best[True]:7.1f} tok/s, Python path {best[False]:7.1f} tok/s, "
              f"{best[True] / best[False]:.2f}x ({same})", flush=True)


if __name__ == "__main__":
    main()
