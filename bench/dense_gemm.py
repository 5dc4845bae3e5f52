"""The base model's projections, tile-layout kernel against oneDNN, side by side in one process.

    python bench/dense_gemm.py [--model smollm2-135m-instruct] [--repeats 5]

(1) Each projection shape of the model (bf16, weights streamed from memory: as many distinct
    copies as the model has layers) at 1, 4, 16 and 64 rows: the native kernel of the AMX tile
    layout this CPU runs (kernels/csrc/amx_gemm.c with AMX, kernels/csrc/avx512_bf16_gemm.c
    with AVX-512 BF16) against oneDNN's packed layout, what runs without it.
(2) A decode step of the whole engine at batches of 1, 8 and 16 requests (prompts of 330
    tokens), one engine loaded with each layout, steps alternating between them.
Prints the times and the ratios. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe import best_ms  # noqa: E402

from loragate.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL  # noqa: E402
from loragate.kernels import dense, native  # noqa: E402


def projections(engine: LLMEngine, kernel: str, repeats: int) -> None:
    cfg = engine.model.config  # engine/models/arch.py, ModelArchConfig
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {"q|k|v": (qkv, hidden), "o": (hidden, cfg.num_heads * cfg.head_dim), "gate|up": (2 * inter, hidden),
              "down": (hidden, inter), "head": (cfg.vocab_size, hidden)}
    print(f"(1) projections, {kernel} kernel vs oneDNN, us per call (weights from memory)")
    print("| shape (out x in) | rows | oneDNN | tiled | ratio |\n|---|---|---|---|---|")
    for name, (out, inp) in shapes.items():
        copies = 2 if name == "head" else cfg.num_layers
        weights = [torch.randn(out, inp, dtype=torch.bfloat16) * inp ** -0.5 for _ in range(copies)]
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        tiled = [dense.TiledWeight(w, kernel) for w in weights]
        for t in tiled:
            t.large = None  # the kernel at every row count measured
        del weights
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, inp, dtype=torch.bfloat16)
            a = best_ms(lambda: [dense.dense_linear(x, w, None) for w in onednn], repeats) / copies
            b = best_ms(lambda: [dense.dense_linear(x, w, None) for w in tiled], repeats) / copies
            print(f"| {name} ({out} x {inp}) | {rows} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x |")


def decode_steps(model: str, repeats: int) -> None:
    tiled = LLMEngine(EngineConfig(model=model, dtype="bfloat16"))
    real = native.tiled_gemm_kernel
    native.tiled_gemm_kernel = lambda: None  # the second engine packs its weights for oneDNN
    try:
        onednn = LLMEngine(EngineConfig(model=model, dtype="bfloat16"))
    finally:
        native.tiled_gemm_kernel = real
    print("\n(2) engine decode step, ms (median of alternating steps)")
    print("| batch | oneDNN | tiled | ratio |\n|---|---|---|---|")
    for batch in (1, 8, 16):
        times = {}
        for name, engine in (("tiled", tiled), ("onednn", onednn)):
            rng = random.Random(batch)
            for i in range(batch):
                ids = [rng.randrange(100, 40000) for _ in range(330)]
                engine.add_request(ids, SamplingParams(max_tokens=10 * repeats + 20, temperature=0, ignore_eos=True),
                                   f"{name}-{batch}-{i}")
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                    engine.scheduler.waiting:
                engine.step()  # prefill
            times[name] = []
        for _ in range(10 * repeats):
            for name, engine in (("tiled", tiled), ("onednn", onednn)):
                t0 = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["onednn"]), statistics.median(times["tiled"])
        print(f"| {batch} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x |")
        for engine in (tiled, onednn):
            while engine.has_unfinished:
                engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kernel = native.tiled_gemm_kernel()
    if kernel is None:
        raise SystemExit("this CPU has neither AMX nor AVX-512 BF16 (or native kernels are off): nothing to compare")
    torch.manual_seed(0)
    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16"))
    projections(engine, kernel, args.repeats)
    del engine
    decode_steps(args.model, args.repeats)


if __name__ == "__main__":
    main()
