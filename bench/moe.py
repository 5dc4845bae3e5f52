"""One sparse-expert MLP layer, engine against transformers, side by side in one process.

    python bench/moe.py [--experts 128] [--top-k 8] [--hidden 2048] [--expert-size 768] [--repeats 10]

Default shapes: one layer of Qwen3-30B-A3B (128 experts of 768, 8 per token, hidden 2048),
bf16, random weights, 2 threads. The same router and expert weights go into transformers'
Qwen3MoeSparseMoeBlock (with the two of its experts implementations that suit a CPU: the eager
per-expert loop and grouped_mm; batched_mm, which gathers every token's expert weights, took
28 ms, 551 ms and 14 s here) and into engine/models/moe.SparseMoE; all run
the same inputs: a decode step of 1 and of 16 tokens and a prefill chunk of 256. Each figure
is the best of --repeats. Prints milliseconds per call, ours against the fastest of
transformers', and the largest difference from the eager loop's output (bf16: the GEMMs may
accumulate in another order, so a few units in the last place).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from loragate.engine.models.moe import SparseMoE


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def layer_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The MoE layer's shape options (Qwen3-30B-A3B's by default), shared with bench/moe_lora.py."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-size", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def main() -> None:
    args = layer_parser(__doc__, repeats=10).parse_args()
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    torch.set_num_threads(2)
    dtype = torch.bfloat16
    hf_config = Qwen3MoeConfig(hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
                               moe_intermediate_size=args.expert_size, norm_topk_prob=True)
    hf = Qwen3MoeSparseMoeBlock(hf_config).to(dtype).eval()
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.5)
        hf.experts.gate_up_proj.normal_(0, 0.02)
        hf.experts.down_proj.normal_(0, 0.02)
    implementations = {}  # transformers' experts implementations that run on this CPU
    for name in ("eager", "grouped_mm"):
        hf.experts.config._experts_implementation = None if name == "eager" else name
        try:
            with torch.inference_mode():
                hf(torch.randn(1, 4, args.hidden, dtype=dtype))
            implementations[name] = name
        except Exception as e:  # noqa: BLE001 - an implementation this build lacks is left out
            print(f"transformers' {name} experts do not run here: {type(e).__name__}: {str(e)[:100]}")
    arch = SimpleNamespace(num_experts=args.experts, experts_per_token=args.top_k, expert_size=args.expert_size,
                           hidden_size=args.hidden, normalize_expert_weights=True, expert_weights_in_fp32=False)
    ours = SparseMoE(arch, dtype)
    ours.router.copy_(hf.gate.weight)
    ours.gate_up.copy_(hf.experts.gate_up_proj)
    ours.down.copy_(hf.experts.down_proj)
    ours.pack()
    print(f"one MoE layer: {args.experts} experts of {args.expert_size}, top {args.top_k}, hidden {args.hidden}, "
          f"bf16, {torch.get_num_threads()} threads")
    names = list(implementations)
    print(f"| tokens | {' | '.join(f'transformers {n} ms' for n in names)} | loragate ms | vs fastest | max abs diff |")
    print("|---" * (len(names) + 4) + "|")
    with torch.inference_mode():
        for tokens in (1, 16, 256):
            x = torch.randn(tokens, args.hidden, dtype=dtype)
            hf.experts.config._experts_implementation = None
            want = hf(x.unsqueeze(0))[0]  # eager: the reference the tests check against
            got = ours.forward(x, None, native=True)
            diff = float((got.float() - want.float()).abs().max())
            times = []
            for name in names:
                hf.experts.config._experts_implementation = None if name == "eager" else name
                times.append(best_ms(lambda: hf(x.unsqueeze(0)), args.repeats))
            t_ours = best_ms(lambda: ours.forward(x, None, native=True), args.repeats)
            print(f"| {tokens} | {' | '.join(f'{t:.2f}' for t in times)} | {t_ours:.2f} | {min(times) / t_ours:.2f}x "
                  f"| {diff:.2g} |")


if __name__ == "__main__":
    main()
