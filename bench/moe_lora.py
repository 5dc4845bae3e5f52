"""Expert adapters on one sparse-expert MLP layer: engine against transformers + peft, side by
side in one process.

    python bench/moe_lora.py [--experts 128] [--top-k 8] [--hidden 2048] [--expert-size 768] [--rank 16] [--repeats 5]

Default shapes: one layer of Qwen3-30B-A3B (128 experts of 768, 8 per token, hidden 2048),
bf16, 2 threads, rank-16 adapters on every expert's gate/up and down (peft's
target_parameters; gate/up at rank 32 as peft's all-linear makes it) with random weights.
peft adapts the stacked parameters by adding B @ A for every expert to the weights on each
forward; the engine adds each expert's LoRA to the outputs of the tokens routed to it, per
token's adapter. Cases: 1 and 16 tokens of one adapter, a prefill chunk of 256, and 16 tokens
of 4 adapters, which peft runs as 4 calls (one per active adapter; it cannot mix them in a
batch). Each figure is the best of --repeats; the largest difference from peft's output
is printed too (bf16: peft rounds W + BA to bf16 before the product, the engine adds the
product's LoRA term, so some units in the last place).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from moe import best_ms, layer_parser  # bench/moe.py: this script's folder is on sys.path


def main() -> None:
    ap = layer_parser(__doc__, repeats=5)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from loragate.adapters.loader import load_adapter
    from loragate.adapters.pool import LoraSlotPool
    from loragate.engine.batch import LoraBatch
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.engine.models.moe import SparseMoE
    from loragate.kernels.lora import plan_segments

    torch.manual_seed(0)
    torch.set_num_threads(2)
    dtype, names, r = torch.bfloat16, ["a", "b", "c", "d"], args.rank
    hf_config = Qwen3MoeConfig(hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
                               moe_intermediate_size=args.expert_size, norm_topk_prob=True, num_hidden_layers=1,
                               vocab_size=128, intermediate_size=args.expert_size, head_dim=128,
                               num_attention_heads=args.hidden // 128, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    arch = ModelArchConfig.from_hf(hf_config)
    ours = SparseMoE(arch, dtype)
    ours.router.copy_(block.gate.weight)
    ours.gate_up.copy_(block.experts.gate_up_proj)
    ours.down.copy_(block.experts.down_proj)
    ours.pack()

    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], rank_pattern={r".*\.gate_up_proj": 2 * r},
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.02)
    pool = LoraSlotPool(arch, len(names), 2 * r, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=names)
        for name in names:
            path = Path(tmp) / name  # peft saves each named adapter in its own folder
            weights = load_adapter(path, arch, 2 * r)
            pool.make_stacks(weights)
            pool.acquire(name, lambda: weights)
    slot = {name: pool.slot_of[name] for name in names}
    peft_block = peft_model.base_model.model.model.layers[0].mlp

    def batch_of(per_adapter: dict[str, int]):
        indptr, slots = [0], []
        for name, n in per_adapter.items():
            indptr.append(indptr[-1] + n)
            slots.append(slot[name])
        used = [s for s in slots]
        return SimpleNamespace(use_native_kernels=True, lora=LoraBatch(plan_segments(indptr, slots), pool, pool.max_rank_of(used),
                                              pool.modules_of(used)))

    def peft_run(x, per_adapter):
        outs, start = [], 0
        for name, n in per_adapter.items():
            peft_model.set_adapter(name)
            outs.append(peft_block(x[None, start:start + n])[0])
            start += n
        return torch.cat(outs)

    print(f"one MoE layer: {args.experts} experts of {args.expert_size}, top {args.top_k}, hidden {args.hidden}, "
          f"bf16, {torch.get_num_threads()} threads; expert adapters of rank {r} (gate/up {2 * r})")
    print("| tokens | adapters | transformers + peft ms | loragate ms | speedup | loragate without the adapters ms "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|")
    cases = [{"a": 1}, {"a": 16}, {name: 4 for name in names}, {"a": 256}]
    with torch.inference_mode():
        for per_adapter in cases:
            n = sum(per_adapter.values())
            x = torch.randn(n, args.hidden, dtype=dtype)
            batch = batch_of(per_adapter)
            diff = float((ours.forward(x, batch, True).float() - peft_run(x, per_adapter).float()).abs().max())
            t_peft = best_ms(lambda: peft_run(x, per_adapter), args.repeats)
            t_ours = best_ms(lambda: ours.forward(x, batch, True), args.repeats)
            t_base = best_ms(lambda: ours.forward(x, None, True), args.repeats)
            print(f"| {n} | {len(per_adapter)} | {t_peft:.1f} | {t_ours:.2f} | {t_peft / t_ours:.1f}x | {t_base:.2f} "
                  f"| {diff:.2g} |")


if __name__ == "__main__":
    main()
