"""Adapters with row terms (engine/models/slot_rows.py) against peft's PeftModel: DoRA
(use_dora) and lora_bias, mixed in one batch with plain LoRA adapters and the base model,
and through slot reuse (fp32). Qwen2 has q/k/v biases, which DoRA must leave unscaled."""

from __future__ import annotations

import pytest
import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.slot_rows import dora_scales

from .test_multi_lora import check_mixed_batch, peft_greedy

# (name, rank, alpha, rslora, target_modules, layers_to_transform, use_dora, lora_bias)
ADAPTERS = [
    ("dora-all-r8", 8, 16, False, "all-linear", None, True, False),
    ("dora-qkv-r4-rs-layer1", 4, 8, True, ["q_proj", "k_proj", "v_proj"], [1], True, False),
    ("dora-mlp-r16", 16, 8, False, ["gate_proj", "up_proj", "down_proj"], None, True, False),
    ("bias-qv-r8", 8, 32, False, ["q_proj", "v_proj", "down_proj"], None, False, True),
    ("lora-all-r8", 8, 16, False, "all-linear", None, False, False),
]


@pytest.fixture(scope="module")
def dora_dirs(tiny_model, tmp_path_factory, save_lora):
    root = tmp_path_factory.mktemp("dora")
    return {name: save_lora(tiny_model, root / name, 0.5 / r ** 0.5, seed=10 + i, r=r, lora_alpha=a, use_rslora=rs,
                            target_modules=t, layers_to_transform=layers, use_dora=dora, lora_bias=bias,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            for i, (name, r, a, rs, t, layers, dora, bias) in enumerate(ADAPTERS)}


def test_dora_and_lora_bias_adapters_in_a_mixed_batch_match_peft(tiny_model, dora_dirs):
    check_mixed_batch(tiny_model, dora_dirs, vocab=512)


def test_dora_is_not_plain_lora_here(tiny_model, dora_dirs):
    """Guards the comparison: the rescale changes the answer, so ignoring it would fail."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32"), progress=False)
    engine.add_adapter("d", dora_dirs["dora-all-r8"])
    weights = engine.adapters["d"][1]
    scales = torch.cat(list(dora_scales(engine.model, weights).values()))
    assert (scales - 1).abs().max() > 0.2
    prompt = [5, 6, 7, 8, 9]
    dora_tokens, _ = peft_greedy(tiny_model, dora_dirs["dora-all-r8"], prompt, 8)
    weights.magnitudes.clear()  # the same A and B served as a plain LoRA
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params, adapter="d")
    out = []
    while engine.has_unfinished:
        out += engine.step()
    assert out[-1].token_ids != dora_tokens


def test_an_adapter_prepared_beforehand_loads_without_computing_its_scales(tiny_model, dora_dirs, monkeypatch):
    """prepare_adapter_weights (the gateway calls it from a worker thread) leaves the slot load,
    in the engine's loop, nothing to compute; the answer is peft's all the same."""
    from loragate.adapters.loader import load_adapter
    from loragate.engine.models import slot_rows

    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32"), progress=False)
    weights = load_adapter(dora_dirs["dora-mlp-r16"], engine.model.config, 64)
    engine.prepare_adapter_weights(weights)
    assert weights.dora_scales
    monkeypatch.setattr(slot_rows, "dora_scales", lambda *a: pytest.fail("DoRA scales computed at slot load"))
    engine.add_adapter_weights("d", weights)
    prompt = [5, 6, 7, 8, 9]
    engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapter="d")
    out = []
    while engine.has_unfinished:
        out += engine.step()
    assert out[-1].token_ids == peft_greedy(tiny_model, dora_dirs["dora-mlp-r16"], prompt, 8)[0]


def test_a_slot_passed_between_adapters_with_and_without_row_terms_matches_peft(tiny_model, dora_dirs):
    """One slot: each adapter evicts the previous one, so a plain LoRA lands where a DoRA
    adapter's scales (or a lora_bias adapter's shifts) were and the other way round."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", max_loras=1), progress=False)
    order = ["dora-all-r8", "lora-all-r8", "dora-mlp-r16", "bias-qv-r8", "lora-all-r8", "dora-qkv-r4-rs-layer1"]
    for name in set(order):
        engine.add_adapter(name, dora_dirs[name])
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = [9, 8, 7, 6]
    for name in order:
        engine.add_request(prompt, params, adapter=name)
        out = []
        while engine.has_unfinished:
            out += engine.step()
        assert out[-1].token_ids == peft_greedy(tiny_model, dora_dirs[name], prompt, 6)[0], name
    assert engine.lora_pool.stats.evictions == len(order) - 1


@pytest.mark.slow
def test_dora_on_smollm2_matches_peft(real_model_dir, tmp_path, save_lora):
    dirs = {"dora-all": save_lora(real_model_dir, tmp_path / "a", 0.02, seed=1, r=8, lora_alpha=16,
                                  target_modules="all-linear", use_dora=True),
            "dora-qv": save_lora(real_model_dir, tmp_path / "b", 0.02, seed=2, r=16, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj"], use_dora=True),
            "lora": save_lora(real_model_dir, tmp_path / "c", 0.02, seed=3, r=8, lora_alpha=16,
                              target_modules="all-linear")}
    check_mixed_batch(real_model_dir, dirs, vocab=49152, logprob_atol=2e-3)
