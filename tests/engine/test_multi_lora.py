"""Mixed-adapter batches against peft's PeftModel, one adapter at a time (fp32)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loragate.engine import EngineConfig, LLMEngine, SamplingParams

# (name, rank, alpha, rslora, target_modules, layers_to_transform)
ADAPTERS = [
    ("attn-r4", 4, 8, False, ["q_proj", "k_proj", "v_proj", "o_proj"], None),
    ("mlp-r8", 8, 16, False, ["gate_proj", "up_proj", "down_proj"], None),
    ("all-r16-rs", 16, 32, True, "all-linear", None),
    ("qv-r64", 64, 16, False, ["q_proj", "v_proj"], None),
    ("all-r8-layer1", 8, 4, False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], [1]),
    ("regex-r16", 16, 64, False, r".*\.(k_proj|down_proj)", None),
]


def make_adapters(save_lora, base_dir, root):
    return {name: save_lora(base_dir, root / name, 0.5 / r ** 0.5, seed=i, r=r, lora_alpha=a, use_rslora=rs,
                            target_modules=t, layers_to_transform=layers, lora_dropout=0.0, bias="none",
                            task_type="CAUSAL_LM")
            for i, (name, r, a, rs, t, layers) in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory, save_lora):
    return make_adapters(save_lora, tiny_llama, tmp_path_factory.mktemp("adapters"))


def peft_greedy(base_dir, adapter_dir, prompt, n):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    model.eval()
    out = torch.tensor([prompt])
    with torch.no_grad():
        # A plain argmax loop, not generate(): its min_new_tokens (to run all n steps) bans EOS,
        # while the engine's ignore_eos only keeps going past it (Gemma 3 does pick EOS here).
        for _ in range(n):
            out = torch.cat((out, model(out).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        logits = model(out[:, :-1]).logits[0, len(prompt) - 1:]
    return out[0, len(prompt):].tolist(), torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def real_adapter_dirs(real_model_dir, tmp_path_factory, save_lora):
    return make_adapters(save_lora, real_model_dir, tmp_path_factory.mktemp("real-adapters"))


def test_mixed_batch_matches_peft_per_adapter(tiny_llama, adapter_dirs):
    check_mixed_batch(tiny_llama, adapter_dirs, vocab=512)


def test_mixed_batch_matches_peft_on_phi3(tiny_phi3, tmp_path, save_lora):
    """Phi-3's checkpoints and peft's adapters fuse q/k/v and gate/up into one module each:
    the same recipes, on qkv_proj and gate_up_proj (a regex, all-linear, one layer only)."""
    dirs = make_adapters(save_lora, tiny_phi3, tmp_path)
    assert "qkv_proj" in (dirs["attn-r4"] / "adapter_config.json").read_text()
    check_mixed_batch(tiny_phi3, dirs, vocab=512)


def test_attention_adapters_on_sparse_expert_models_match_peft(tiny_moe, tmp_path, save_lora):
    """Mixtral and Qwen3-MoE: adapters of their attention projections, plain, rsLoRA and DoRA,
    in one batch with base requests, each request PeftModel's tokens."""
    dirs = {"attn": save_lora(tiny_moe, tmp_path / "attn", 0.15, seed=1, r=8, lora_alpha=16,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            "qv-rs": save_lora(tiny_moe, tmp_path / "qv", 0.15, seed=2, r=4, lora_alpha=8, use_rslora=True,
                               target_modules=["q_proj", "v_proj"]),
            "dora": save_lora(tiny_moe, tmp_path / "dora", 0.15, seed=3, r=8, lora_alpha=8, use_dora=True,
                              target_modules=["k_proj", "o_proj"])}
    check_mixed_batch(tiny_moe, dirs, vocab=512)


def test_expert_and_router_adapters_match_peft(tiny_moe, tmp_path, save_lora):
    """peft's target_parameters on Mixtral and Qwen3-MoE: each expert's own LoRA pair on the
    stacked gate/up and down parameters, and the router's pair. all-linear (which peft extends
    to them), the experts alone with a rank_pattern, the router alone (rsLoRA), one layer's
    down experts, in one batch with an attention adapter and base requests."""
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    dirs = {"all": save_lora(tiny_moe, tmp_path / "all", 0.15, seed=4, r=8, lora_alpha=16, target_modules="all-linear"),
            "experts": save_lora(tiny_moe, tmp_path / "experts", 0.15, seed=5, r=4, lora_alpha=8, target_modules=[],
                                 target_parameters=experts, rank_pattern={"experts.down_proj": 6}),
            "router": save_lora(tiny_moe, tmp_path / "router", 0.3, seed=6, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=[], target_parameters=["gate.weight"]),
            "layer1-down": save_lora(tiny_moe, tmp_path / "layer1", 0.15, seed=7, r=8, lora_alpha=8,
                                     target_modules=["q_proj"], target_parameters=["layers.1.mlp.experts.down_proj"]),
            "attn": save_lora(tiny_moe, tmp_path / "attn", 0.15, seed=1, r=8, lora_alpha=16,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
    check_mixed_batch(tiny_moe, dirs, vocab=512)


@pytest.mark.slow
def test_mixed_batch_matches_peft_on_smollm2(real_model_dir, real_adapter_dirs):
    check_mixed_batch(real_model_dir, real_adapter_dirs, vocab=49152, logprob_atol=2e-3)


@pytest.mark.slow
def test_mixed_batch_matches_peft_on_gemma3_270m(real_gemma3_dir, tmp_path_factory, save_lora):
    root = tmp_path_factory.mktemp("gemma3-adapters")
    dirs = {name: save_lora(real_gemma3_dir, root / name, 0.02, seed=i, r=r, lora_alpha=2 * r, target_modules=t)
            for i, (name, r, t) in enumerate([("attn", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                               ("all", 16, "all-linear")])}
    check_mixed_batch(real_gemma3_dir, dirs, vocab=262144, logprob_atol=2e-3)


def test_adapters_of_a_gemma3_multimodal_model_match_peft_on_text(tiny_gemma3_multimodal, tmp_path, save_lora):
    """peft names a multimodal Gemma 3's decoder modules model.language_model.layers.N...; its
    "all-linear" also adapts the vision tower (fc1, out_proj, ...), which text never runs, and
    target regexes are written against those names."""
    dirs = {"all": save_lora(tiny_gemma3_multimodal, tmp_path / "all", 0.3, seed=30, r=8, lora_alpha=16,
                             target_modules="all-linear"),
            "regex": save_lora(tiny_gemma3_multimodal, tmp_path / "regex", 0.3, seed=31, r=4, lora_alpha=8,
                               target_modules=r".*language_model.*\.(q_proj|o_proj|up_proj)",
                               rank_pattern={"o_proj": 2}),
            "names": save_lora(tiny_gemma3_multimodal, tmp_path / "names", 0.3, seed=32, r=4, lora_alpha=4,
                               target_modules=["v_proj", "down_proj", "fc2"], layers_to_transform=[0, 2])}
    check_mixed_batch(tiny_gemma3_multimodal, dirs, vocab=500)
    # Adapters saved under transformers 4 name the same modules language_model.model.layers.N...
    from safetensors.torch import load_file, save_file

    from loragate.adapters.loader import load_adapter
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.engine.models.loader import load_hf_config

    old = tmp_path / "transformers-4"
    old.mkdir()
    (old / "adapter_config.json").write_text((dirs["all"] / "adapter_config.json").read_text())
    tensors = load_file(dirs["all"] / "adapter_model.safetensors")
    save_file({k.replace("model.language_model.", "language_model.model."): v for k, v in tensors.items()},
              old / "adapter_model.safetensors")
    arch = ModelArchConfig.from_hf(load_hf_config(tiny_gemma3_multimodal))
    new, renamed = load_adapter(dirs["all"], arch, 64), load_adapter(old, arch, 64)
    assert new.modules.keys() == renamed.modules.keys() and len(new.modules) == 3 * 7
    assert all(torch.equal(new.modules[t][1], renamed.modules[t][1]) for t in new.modules)


def check_mixed_batch(model_dir, adapter_dirs, vocab, logprob_atol=1e-4):
    """All adapters plus base requests in one engine batch; each request must produce
    exactly PeftModel's greedy tokens for its adapter alone, log-probs within tolerance."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", max_loras=8, max_lora_rank=64),
                       progress=False)
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    g = torch.Generator().manual_seed(3)
    names = list(adapter_dirs) + [None, None]
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (len(names),), generator=g)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    reqs = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, names)]
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    for req, prompt, name in zip(reqs, prompts, names):
        tokens, ref_logprobs = peft_greedy(model_dir, adapter_dirs.get(name), prompt, 8)
        assert done[req.request_id].token_ids == tokens, f"adapter {name} diverged from peft"
        ours = torch.tensor([lp for lp, _ in req.logprobs])
        theirs = ref_logprobs[torch.arange(8), torch.tensor(tokens)]
        torch.testing.assert_close(ours, theirs, atol=logprob_atol, rtol=0)
    pool = engine.lora_pool
    assert pool.num_pinned == 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_per_module_ranks_and_alphas_match_peft(tiny_model, tmp_path, save_lora):
    """rank_pattern and alpha_pattern: peft's first matching pattern sets a module's r and
    alpha (and so its scaling); the slot pads the smaller ranks with zeros."""
    dirs = {
        "pattern": save_lora(tiny_model, tmp_path / "p", 0.15, seed=20, r=8, lora_alpha=16, target_modules="all-linear",
                             rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 16}, alpha_pattern={"v_proj": 40}),
        "pattern-rs-dora": save_lora(tiny_model, tmp_path / "q", 0.15, seed=21, r=4, lora_alpha=8, use_rslora=True,
                                     use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
                                     rank_pattern={"gate_proj": 12}, alpha_pattern={r"layers\.0\..*": 2}),
        "plain": save_lora(tiny_model, tmp_path / "r", 0.15, seed=22, r=8, lora_alpha=8, target_modules=["o_proj"]),
    }
    check_mixed_batch(tiny_model, dirs, vocab=512)


def test_adapters_change_the_output(tiny_llama, adapter_dirs):
    """Guards the comparison above: with these weights an adapter is not a no-op."""
    prompt = [5, 6, 7, 8, 9]
    base_tokens, _ = peft_greedy(tiny_llama, None, prompt, 8)
    changed = sum(peft_greedy(tiny_llama, d, prompt, 8)[0] != base_tokens for d in adapter_dirs.values())
    assert changed >= 4


@pytest.mark.parametrize("short_run", [64, 0], ids=["native-and-torch", "torch"])
def test_expert_adapters_on_a_long_prompt_match_peft(tiny_qwen3_moe, tmp_path, save_lora, monkeypatch, short_run):
    """A 300-token prefill puts runs of over 64 rows of one adapter on an expert, which torch
    takes (the native kernel takes runs up to 64); with 0, torch takes every run."""
    from loragate.engine.models import moe

    monkeypatch.setattr(moe, "SHORT_SEGMENT", short_run)
    path = save_lora(tiny_qwen3_moe, tmp_path / "all", 0.15, seed=10, r=8, lora_alpha=16, target_modules="all-linear")
    engine = LLMEngine(EngineConfig(model=str(tiny_qwen3_moe), dtype="float32", max_loras=2, max_lora_rank=64),
                       progress=False)
    engine.add_adapter("all", path)
    prompt = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    req = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1),
                             adapter="all")
    outs = [out for _ in range(100) if engine.has_unfinished for out in engine.step() if out.finished]
    tokens, ref_logprobs = peft_greedy(tiny_qwen3_moe, path, prompt, 8)
    assert outs[0].token_ids == tokens
    torch.testing.assert_close(torch.tensor([lp for lp, _ in req.logprobs]), ref_logprobs[torch.arange(8), tokens],
                               atol=1e-4, rtol=0)


def test_transformers_4_per_expert_adapters_match_peft(tiny_moe, tmp_path, save_lora, save_per_expert_lora):
    """Adapters of transformers 4's per-expert linears (most published Mixtral and Qwen3-MoE
    LoRAs), their targets a list or a regex: converted as peft converts them on load (gate and
    up fused block-diagonally), each request PeftModel's tokens, in one batch with a
    transformers 5 expert adapter."""
    dirs = {"per-expert": save_per_expert_lora(tiny_moe, tmp_path / "per-expert", seed=8),
            "per-expert-regex": save_per_expert_lora(tiny_moe, tmp_path / "regex", seed=12, regex=True),
            "stacked": save_lora(tiny_moe, tmp_path / "stacked", 0.15, seed=9, r=4, lora_alpha=8,
                                 target_modules=["k_proj"], target_parameters=["mlp.experts.down_proj"])}
    check_mixed_batch(tiny_moe, dirs, vocab=512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expert_lora_kernels_agree_with_torch(dtype):
    """One MoE block, three adapters on its experts and router in one batch of runs short and
    long: the native kernels (AMX for bf16 experts with 4+ rows, AVX-512 for the others) give
    what plain torch gives."""
    from types import SimpleNamespace

    from transformers import Qwen3MoeConfig

    from loragate.adapters.config import LoraConfig
    from loragate.adapters.loader import LoraWeights
    from loragate.adapters.pool import LoraSlotPool
    from loragate.engine.batch import LoraBatch
    from loragate.engine.models import moe
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.kernels.lora import plan_segments

    arch = ModelArchConfig.from_hf(Qwen3MoeConfig(hidden_size=64, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, num_hidden_layers=1, vocab_size=64,
                                                  head_dim=16, num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(0)
    block = moe.SparseMoE(arch, dtype)
    for t in (block.router, block.gate_up, block.down):
        t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    block.pack()
    pool = LoraSlotPool(arch, 3, 16, dtype)
    slots = []
    for i, r in enumerate((16, 8, 4)):
        modules = {(0, name): (torch.randn(p.experts, r, p.fan_in, generator=g) * 0.2,
                               torch.randn(p.experts, p.fan_out, r, generator=g) * 0.2)
                   for name, p in arch.lora_parameters.items()}
        slots.append(pool.acquire(str(i), lambda m=modules, r=r: LoraWeights(r, LoraConfig(r, r, ()), m)))
    indptr, seg_slots = [0, 3, 43, 44, 90, 97], [slots[0], slots[1], -1, slots[2], slots[0]]
    x = torch.randn(indptr[-1], 64, generator=g).to(dtype)

    def run(native: bool):
        lora = LoraBatch(plan_segments(indptr, seg_slots), pool, 16, pool.modules_of(slots))
        return block.forward(x, SimpleNamespace(lora=lora, use_native_kernels=native), native)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(run(True).double(), run(False).double(), **tol)
    assert not torch.allclose(run(True), block.forward(x, None, True))  # the adapters do something
