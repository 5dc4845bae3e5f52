"""The decoder layers in one native call (kernels/decoder_layers.py) give exactly the bits of the
Python path that calls the same kernels one at a time: the same greedy tokens and log-probs,
bf16, with mixed LoRA batches, q/k norms, biases, sliding windows, RoPE-less layers and
speculative verification; and steps it cannot take (prefill chunks, DoRA) take the Python path."""

from __future__ import annotations

import pytest
import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.kernels import decoder_layers, native
from loragate.kernels.dense import TiledWeight

pytestmark = pytest.mark.skipif(native.library() is None or native.tiled_gemm_kernel() is None,
                                reason="needs the native kernels and a CPU with AMX or AVX-512 BF16")


def generate(model_dir, adapters: dict, fused: bool, monkeypatch, **config) -> tuple[list, int]:
    """Greedy tokens and log-probs of a mixed batch (two adapters and the base model, prompts
    with repeats so n-gram speculation has something to propose), and how many steps ran fused."""
    monkeypatch.setattr(decoder_layers, "enabled", fused)
    calls = []
    real_call = decoder_layers.FusedLayers._call
    monkeypatch.setattr(decoder_layers.FusedLayers, "_call", lambda self, *a: calls.append(1) or real_call(self, *a))
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu", max_loras=2,
                                    max_lora_rank=8, enable_prefix_caching=False, **config), progress=False)
    assert isinstance(engine.model.layers[0].qkv_proj.packed, TiledWeight)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    g = torch.Generator().manual_seed(0)
    names = [*adapters, None, *adapters, None]
    prompts = [(torch.randint(3, 200, (5,), generator=g).tolist() * 4)[:int(n)]
               for n in torch.randint(6, 20, (len(names),), generator=g)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    reqs = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, names)]
    while engine.has_unfinished:
        engine.step()
    return [(r.output_token_ids, r.logprobs) for r in reqs], len(calls)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "smollm3"])
@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_one_call_gives_the_python_paths_bits(arch, speculative, request, tmp_path, save_lora, monkeypatch):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    targets = ["q_proj", "v_proj", "down_proj"] if arch != "phi3" else ["qkv_proj", "down_proj"]
    adapters = {f"a{i}": save_lora(model_dir, tmp_path / f"a{i}", 0.3, seed=i, r=8, lora_alpha=16,
                                   target_modules=targets) for i in range(2)}
    fused, calls = generate(model_dir, adapters, True, monkeypatch, speculative=speculative)
    python, no_calls = generate(model_dir, adapters, False, monkeypatch, speculative=speculative)
    assert calls > 0 and no_calls == 0
    assert fused == python


def test_the_bundled_model_with_adapters(real_model_dir, tmp_path, save_lora, monkeypatch):
    adapters = {f"a{i}": save_lora(real_model_dir, tmp_path / f"a{i}", 0.05, seed=i, r=8, lora_alpha=16,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
                for i in range(2)}
    fused, calls = generate(real_model_dir, adapters, True, monkeypatch)
    python, _ = generate(real_model_dir, adapters, False, monkeypatch)
    assert calls > 0 and fused == python


def test_dora_steps_take_the_python_path(tiny_llama, tmp_path, save_lora, monkeypatch):
    """DoRA's per-row terms are applied outside the kernels this composes: not fused, still right."""
    adapters = {"d": save_lora(tiny_llama, tmp_path / "d", 0.3, seed=0, r=8, lora_alpha=16, use_dora=True,
                               target_modules=["q_proj", "v_proj"])}
    fused, calls = generate(tiny_llama, adapters, True, monkeypatch)
    python, _ = generate(tiny_llama, adapters, False, monkeypatch)
    assert calls == 0 and fused == python


@pytest.mark.parametrize("arch, dtype, ok", [("llama", "bfloat16", True), ("llama", "float32", False),
                                             ("gemma3", "bfloat16", False), ("mixtral", "bfloat16", False),
                                             ("olmo2", "bfloat16", False), ("granite", "bfloat16", False)])
def test_which_models_can_run_in_one_call(arch, dtype, ok, request):
    """Other layer types (their own norms, experts, scaled residuals) and fp32 keep the per-kernel path."""
    engine = LLMEngine(EngineConfig(model=str(request.getfixturevalue(f"tiny_{arch}")), dtype=dtype, device="cpu",
                                    max_loras=0), progress=False)
    assert decoder_layers.FusedLayers(engine.model).ok is ok
