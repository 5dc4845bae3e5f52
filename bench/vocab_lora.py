"""What LoRA on the vocabulary modules (embed_tokens, lm_head) costs, side by side in one run.

    python bench/vocab_lora.py [--model smollm2-135m-instruct] [--requests 32] [--max-tokens 128] [--distinct 8]

One engine (bf16, prefix caching off), N concurrent greedy requests over --distinct rank-16
adapters, alternately (best of 3): adapters on q,k,v,o, then the same plus embed_tokens and
lm_head (engine/models/vocab_lora.py). Prints output tok/s for both and their ratio, and the
time to load one of each from disk (the vocabulary adapter's file carries peft's copies of the
embedding and head) and to check it against the base model, as an upload does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from multi_lora import TARGETS, make_adapters, prompts_for, run_engine  # noqa: E402

from loragate.adapters.loader import load_adapter  # noqa: E402
from loragate.engine import EngineConfig, LLMEngine  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402
from loragate.engine.models.vocab_lora import check_base_copies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--distinct", type=int, default=8, help="distinct adapters in the batch (default: %(default)s)")
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-vocab-"))
    kinds = {"attn": TARGETS["attn"], "attn+vocab": TARGETS["attn"] + ["embed_tokens", "lm_head"]}
    engine = LLMEngine(EngineConfig(model=str(model_dir), max_loras=2 * args.distinct, max_lora_rank=16,
                                    max_num_seqs=args.requests, enable_prefix_caching=False))
    prompts = prompts_for(engine.tokenizer, args.requests)
    mixes = {}
    for kind, targets in kinds.items():
        dirs = make_adapters(model_dir, tmp / kind, targets, args.distinct)
        t0 = time.perf_counter()
        weights = load_adapter(dirs[0], engine.model.config, 16)
        loaded = time.perf_counter() - t0
        check_base_copies(engine.model, weights)
        checked = time.perf_counter() - t0 - loaded
        print(f"{kind}: load from disk {loaded * 1e3:.0f} ms, check against the base {checked * 1e3:.0f} ms", flush=True)
        for i, d in enumerate(dirs):
            engine.add_adapter(f"{kind}-{i}", d)
        mixes[kind] = [f"{kind}-{i % args.distinct}" for i in range(args.requests)]
        run_engine(engine, prompts[:4], mixes[kind][:4], 8)  # warm-up: slots loaded, stacks made
    best = dict.fromkeys(kinds, 0.0)
    for _ in range(3):  # alternately: both see the same machine state
        for kind in kinds:
            best[kind] = max(best[kind], run_engine(engine, prompts, mixes[kind], args.max_tokens))
    for kind, tps in best.items():
        print(f"{kind:11s} {tps:7.1f} tok/s")
    print(f"attn+vocab / attn: {best['attn+vocab'] / best['attn']:.3f}")


if __name__ == "__main__":
    main()
