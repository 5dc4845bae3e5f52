"""Multi-LoRA throughput: loragate's mixed-adapter batches vs peft, side by side in one run.

    python bench/multi_lora.py [--requests 32] [--max-tokens 128] [--device auto|cpu|cuda]

SmolLM2-135M-Instruct, bf16, N concurrent greedy requests. For rank-16 adapters on q,k,v,o
and again on all linear layers, prints output tok/s for: all base; all one adapter; 8
distinct adapters; 32 distinct adapters — plus peft's mixed-batch generate(adapter_names=...)
and one-adapter-at-a-time set_adapter on the 8-adapter mix. Decode is memory-bound, so each
mix is compared with its bytes-moved bound relative to one adapter:
(base bytes + one adapter's bytes) / (base bytes + all distinct adapters' bytes).
Also: base requests with LoRA support on vs an engine built without it, and the p50 time to
load a cold adapter from disk into a pool slot.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loragate.adapters.loader import load_adapter
from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.linear import Projection
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_adapters(model_dir: Path, out: Path, targets: list[str], count: int, rank: int = 16,
                  use_dora: bool = False) -> list[Path]:
    """`count` adapters saved by peft, random A and B (and, for DoRA, magnitudes scaled by 0.9-1.1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                            use_dora=use_dora))
    dirs = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.empty_like(p).uniform_(0.9, 1.1))
                elif "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def prompts_for(tokenizer, n: int, length: int = 64) -> list[list[int]]:
    import argparse as source

    ids = tokenizer.encode(inspect.getsource(source))
    return [ids[500 + 300 * i:][:length] for i in range(n)]


def run_engine(engine: LLMEngine, prompts, adapters, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for p, a in zip(prompts, adapters):
        engine.add_request(p, params, adapter=a)
    n = 0
    while engine.has_unfinished:
        n += len(engine.step())
    return n / (time.perf_counter() - t0)


def peft_baselines(model_dir, dirs, prompts, adapters, max_tokens, tokenizer, device) -> tuple[float, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    names = sorted(set(adapters))
    model = PeftModel.from_pretrained(base, dirs[int(names[0][1:])], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(dirs[int(n[1:])], adapter_name=n)
    model.eval()
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
              pad_token_id=tokenizer.eos_token_id)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=list(adapters), **kw).tolist()
        mixed = len(prompts) * max_tokens / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for n in names:
            rows = [i for i, a in enumerate(adapters) if a == n]
            model.set_adapter(n)
            model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kw).tolist()
        serial = len(prompts) * max_tokens / (time.perf_counter() - t0)
    return mixed, serial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-peft", action="store_true", help="skip the (slow) peft baselines")
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda; peft runs there too")
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    n = args.requests
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    # No prefix caching: every run repeats the same prompts, and cached prefills would favour
    # whichever mix ran before with the same adapter (peft recomputes its prefill every time).
    engine = LLMEngine(EngineConfig(model=str(model_dir), max_loras=n, max_lora_rank=16, max_num_seqs=n,
                                    enable_prefix_caching=False, device=args.device))
    tok = engine.tokenizer
    prompts = prompts_for(tok, n)
    base_bytes = sum(p.numel() * p.element_size() for p in (engine.model.embed_tokens.weight,))  # tied head
    base_bytes += sum(m.in_features * m.out_features * 2 for m in engine.model.modules() if isinstance(m, Projection))

    no_lora = LLMEngine(EngineConfig(model=str(model_dir), max_loras=0, max_num_seqs=n, enable_prefix_caching=False,
                                     device=args.device), progress=False)
    for e in (no_lora, engine):
        run_engine(e, prompts[:4], [None] * 4, 8)  # warm-up
    # Interleaved, best of three: the two engines see the same machine state.
    t_nolora = t_base = 0.0
    for _ in range(3):
        t_nolora = max(t_nolora, run_engine(no_lora, prompts, [None] * n, args.max_tokens))
        t_base = max(t_base, run_engine(engine, prompts, [None] * n, args.max_tokens))
    del no_lora
    print(f"base requests: LoRA support on {t_base:.1f} tok/s, engine without LoRA {t_nolora:.1f} tok/s "
          f"-> {t_base / t_nolora:.3f} (target >= 0.97)", flush=True)

    rows = []
    load_ms = []
    for kind, targets in TARGETS.items():
        dirs = make_adapters(model_dir, tmp / kind, targets, n)
        weights = []
        for i, d in enumerate(dirs):  # cold load: disk -> validated weights -> pool slot
            t0 = time.perf_counter()
            w = load_adapter(d, engine.model.config, 16)
            slot = engine.lora_pool.acquire(f"cold-{kind}-{i}", lambda w=w: w)
            load_ms.append((time.perf_counter() - t0) * 1e3)
            engine.lora_pool.release(slot)
            engine.add_adapter_weights(f"a{i}", w)
            weights.append(w)
        adapter_bytes = weights[0].num_bytes // 2  # bf16 in the pool
        mixes = {"one": ["a0"] * n, "8 distinct": [f"a{i % 8}" for i in range(n)],
                 "32 distinct": [f"a{i % 32}" for i in range(n)]}
        if engine.device.type == "cuda":  # capture this run's CUDA graph shapes outside the measurement
            run_engine(engine, prompts, mixes["one"], args.max_tokens)
        else:
            run_engine(engine, prompts[:4], mixes["one"][:4], 8)
        one = run_engine(engine, prompts, mixes["one"], args.max_tokens)
        for mix, adapters in mixes.items():
            tps = one if mix == "one" else run_engine(engine, prompts, adapters, args.max_tokens)
            distinct = len(set(adapters))
            bound = (base_bytes + adapter_bytes) / (base_bytes + distinct * adapter_bytes)
            rows.append((kind, mix, tps, tps / one, bound))
            print(f"{kind:4s} {mix:12s} {tps:7.1f} tok/s  vs one {tps / one:.3f}  bound {bound:.3f}  "
                  f"of bound {tps / one / bound:.3f}", flush=True)
        if not args.skip_peft and kind == "attn":
            mixed, serial = peft_baselines(model_dir, dirs, prompts, mixes["8 distinct"], args.max_tokens, tok,
                                           engine.device)
            ours8 = next(r[2] for r in rows if r[0] == kind and r[1] == "8 distinct")
            print(f"peft 8 distinct: mixed-batch {mixed:.1f} tok/s, set_adapter one at a time {serial:.1f} tok/s; "
                  f"ours / peft mixed = {ours8 / mixed:.2f}x (target >= 5x), ours / set_adapter = {ours8 / serial:.2f}x",
                  flush=True)
    print(f"\ncold adapter load (disk -> pool slot) p50 {statistics.median(load_ms):.1f} ms (target < 30 ms)")
    print(f"base with LoRA support / without: {t_base / t_nolora:.3f} (target >= 0.97)")
    print("\n| adapters | mix | tok/s | vs one adapter | bytes bound | of bound (target >= 0.9) |\n|---|---|---|---|---|---|")
    print(f"| - | all base | {t_base:.1f} | | | |")
    for kind, mix, tps, rel, bound in rows:
        print(f"| rank 16 {kind} | {mix} | {tps:.1f} | {rel:.3f} | {bound:.3f} | {rel / bound:.3f} |")


if __name__ == "__main__":
    main()
