"""DoRA adapters: what the rescale costs in loragate's mixed batches, and peft beside it.

    python bench/dora.py [--requests 16] [--adapters 4] [--max-tokens 64] [--skip-peft]

SmolLM2-135M-Instruct, bf16, N concurrent greedy requests spread over A DoRA adapters (rank
16 on every linear module, saved by peft with use_dora=True, random B and magnitudes). In
one process: loragate serving them as DoRA, loragate serving the same A and B as plain LoRA
(the rescale left out), and peft, which refuses mixed-adapter batches with DoRA, so it runs
one adapter's requests at a time (set_adapter + generate). Prints output tok/s and ratios,
and the time to compute an adapter's DoRA row scales (once per adapter and engine; the first
also takes each projection's row norms out of it, once per engine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from multi_lora import TARGETS, prompts_for, run_engine  # noqa: E402

from loragate.engine import EngineConfig, LLMEngine  # noqa: E402
from loragate.engine.models.slot_rows import dora_scales  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402


def make_dora_adapters(model_dir: Path, out: Path, count: int, rank: int = 16) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS["all"],
                                            lora_dropout=0.0, use_dora=True))
    dirs = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.empty_like(p).uniform_(0.9, 1.1))
                elif "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(out / f"d{i}")
        dirs.append(out / f"d{i}")
    return dirs


def peft_one_adapter_at_a_time(model_dir, dirs, prompts, adapters, max_tokens, tokenizer) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name="d0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"d{i}")
    model.eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
              pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for name in sorted(set(adapters)):
            rows = [i for i, a in enumerate(adapters) if a == name]
            model.set_adapter(name)
            model.generate(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), **kw)
        return len(prompts) * max_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-peft", action="store_true", help="skip the (slow) peft baseline")
    args = ap.parse_args()
    model_dir = resolve_model(DEFAULT_MODEL)
    dirs = make_dora_adapters(model_dir, Path(tempfile.mkdtemp(prefix="loragate-dora-")), args.adapters)
    config = EngineConfig(model=str(model_dir), max_loras=args.adapters, max_lora_rank=16,
                          max_num_seqs=args.requests, enable_prefix_caching=False)
    dora, plain = LLMEngine(config, progress=False), LLMEngine(config, progress=False)
    for i, d in enumerate(dirs):
        dora.add_adapter(f"d{i}", d)
        plain.add_adapter(f"d{i}", d)
        plain.adapters[f"d{i}"][1].magnitudes.clear()  # the same A and B, served as a plain LoRA
    scales_ms = []
    for name in ("d0", "d1" if args.adapters > 1 else "d0"):  # the first also takes ||W||^2 per row out of the projections, once per engine
        t0 = time.perf_counter()
        dora_scales(dora.model, dora.adapters[name][1])
        scales_ms.append((time.perf_counter() - t0) * 1e3)
    prompts = prompts_for(dora.tokenizer, args.requests)
    adapters = [f"d{i % args.adapters}" for i in range(args.requests)]
    for engine in (dora, plain):
        run_engine(engine, prompts[:4], adapters[:4], 8)  # warm-up: loads every slot
    # Interleaved, best of three: both engines see the same machine state.
    t_dora = t_plain = 0.0
    for _ in range(3):
        t_dora = max(t_dora, run_engine(dora, prompts, adapters, args.max_tokens))
        t_plain = max(t_plain, run_engine(plain, prompts, adapters, args.max_tokens))
    print(f"{args.requests} requests over {args.adapters} adapters (rank 16, all linear modules), {args.max_tokens} "
          f"tokens each, SmolLM2-135M bf16")
    print(f"  loragate, DoRA                 {t_dora:7.1f} tok/s")
    print(f"  loragate, same A/B as LoRA     {t_plain:7.1f} tok/s   DoRA / LoRA {t_dora / t_plain:.3f}")
    if not args.skip_peft:
        peft = peft_one_adapter_at_a_time(model_dir, dirs, prompts, adapters, args.max_tokens, dora.tokenizer)
        print(f"  peft DoRA, one adapter at a time (no mixed batches with DoRA) {peft:7.1f} tok/s   "
              f"loragate / peft {t_dora / peft:.2f}x")
    print(f"  DoRA row scales, once per adapter and engine: {scales_ms[1]:.1f} ms "
          f"({scales_ms[0]:.1f} ms for the engine's first DoRA adapter)")


if __name__ == "__main__":
    main()
