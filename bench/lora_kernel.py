"""The LoRA work of one decode step, kernel against kernel, side by side in one process.

    python bench/lora_kernel.py [--rows 32] [--rank 16] [--repeats 20]

SmolLM2-135M's shapes: 30 layers, each a fused q|k|v projection (576 -> 576 + 192 + 192) and
o_proj (576 -> 576), bf16, rank-16 adapters in a 32-slot pool, one pool per layer like the
engine's. A step's rows are split evenly over 1, 8 or 32 adapters. Each measurement first
evicts the caches (the adapters' weights come from memory, as in a real step) and is the best
of --repeats. Compared:
  per projection   kernels.lora.add_lora_modules: q, k and v in one native call (the engine)
  per module       the same kernel called once per module (q, k, v and o separately)
  no AMX           per projection with the AVX-512 kernel, what CPUs without AMX run
  torch            the torch path (gathered batched matmuls), what runs without native kernels
"""

from __future__ import annotations

import argparse
import time

import torch

from loragate.kernels import native
from loragate.kernels.lora import LoraModule, LoraModules, add_lora_modules, plan_segments

LAYERS, SLOTS, HIDDEN = 30, 32, 576
QKV = {"q_proj": 576, "k_proj": 192, "v_proj": 192}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="decode rows in the step (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)

    def stacks(out: int):
        return (torch.randn(SLOTS, args.rank, HIDDEN, dtype=torch.bfloat16) * 0.02,
                torch.randn(SLOTS, out, args.rank, dtype=torch.bfloat16) * 0.02)

    layers = []
    for _ in range(LAYERS):
        qkv, column = [], 0
        for width in QKV.values():
            qkv.append(LoraModule(column, *stacks(width)))
            column += width
        layers.append((qkv, LoraModule(0, *stacks(HIDDEN))))
    fused = [(LoraModules(qkv), LoraModules([o])) for qkv, o in layers]
    single = [([LoraModules([m]) for m in qkv], LoraModules([o])) for qkv, o in layers]
    no_amx = [(LoraModules(qkv), LoraModules([o])) for qkv, o in layers]
    for group in no_amx:
        for mods in group:
            mods.amx = False
    x = torch.randn(args.rows, HIDDEN, dtype=torch.bfloat16)
    y_qkv = torch.zeros(args.rows, sum(QKV.values()), dtype=torch.bfloat16)
    y_o = torch.zeros(args.rows, HIDDEN, dtype=torch.bfloat16)
    evict = torch.empty(256 << 20, dtype=torch.uint8)

    def per_projection(plan, use_native=True, groups=fused):
        for qkv, o in groups:
            add_lora_modules(y_qkv, x, qkv, plan, args.rank, use_native)
            add_lora_modules(y_o, x, o, plan, args.rank, use_native)

    def per_module(plan):
        for qkv, o in single:
            for m in qkv:
                add_lora_modules(y_qkv, x, m, plan, args.rank)
            add_lora_modules(y_o, x, o, plan, args.rank)

    def best_ms(fn, plan) -> float:
        fn(plan)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            evict.add_(1)
            t0 = time.perf_counter()
            fn(plan)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    kernel = "AMX" if native.amx_available() else "AVX-512/plain" if native.library() else "none (torch only)"
    print(f"{args.rows} decode rows, rank {args.rank}, {LAYERS} layers x (q|k|v, o); native LoRA kernel: {kernel}")
    print("adapters  per projection  per module   no AMX    torch    (each / per projection)")
    for adapters in (1, 8, 32):
        if adapters > args.rows:
            continue
        bounds = [round(i * args.rows / adapters) for i in range(adapters + 1)]
        plan = plan_segments(bounds, list(range(adapters)))
        fast = best_ms(per_projection, plan)
        others = [best_ms(per_module, plan), best_ms(lambda p: per_projection(p, groups=no_amx), plan),
                  best_ms(lambda p: per_projection(p, False), plan)]
        print(f"{adapters:8d}  {fast:11.2f} ms  " + "  ".join(f"{t:6.2f} ms" for t in others)
              + "    (" + ", ".join(f"{t / fast:.2f}x" for t in others) + ")")


if __name__ == "__main__":
    main()
