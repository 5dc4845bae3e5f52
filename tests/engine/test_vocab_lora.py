"""LoRA on the vocabulary modules (embed_tokens, lm_head) against peft, per model family:
tied and untied heads, Gemma's scaled embedding, Granite's multipliers, Gemma 2's softcap."""

from __future__ import annotations

import pytest
import torch

from loragate.adapters.errors import AdapterError
from loragate.engine import EngineConfig, LLMEngine, SamplingParams

from .test_multi_lora import check_mixed_batch

RECIPES = [  # (name, rank, target_modules)
    ("vocab", 4, ["q_proj", "embed_tokens", "lm_head"]),
    ("embed", 8, ["embed_tokens"]),
    ("head", 4, ["lm_head", "v_proj"]),
    ("attn", 4, ["q_proj", "o_proj"]),
]


def test_vocab_adapters_in_a_mixed_batch_match_peft(tiny_model, tmp_path, save_lora):
    dirs = {name: save_lora(tiny_model, tmp_path / name, 0.3, seed=40 + i, r=r, lora_alpha=2 * r, target_modules=t)
            for i, (name, r, t) in enumerate(RECIPES)}
    check_mixed_batch(tiny_model, dirs, vocab=500)


def test_vocab_adapters_of_a_gemma3_multimodal_model_match_peft(tiny_gemma3_multimodal, tmp_path, save_lora):
    """Its embedding is model.language_model.embed_tokens; its head is still lm_head."""
    dirs = {name: save_lora(tiny_gemma3_multimodal, tmp_path / name, 0.3, seed=70 + i, r=r, lora_alpha=2 * r,
                            target_modules=t) for i, (name, r, t) in enumerate(RECIPES[:3])}
    check_mixed_batch(tiny_gemma3_multimodal, dirs, vocab=500)


@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "v_proj"], ["lm_head"]])
def test_adapters_with_tied_vocab_loras_match_peft(tiny_qwen2, tmp_path, save_lora, targets):
    """ensure_weight_tying: on a tied model, adapting the embedding or the head adapts both, with
    one pair between them (A of one is B of the other, transposed); peft saves both, and
    rewrites target_modules to name only the embedding."""
    dirs = {"tied": save_lora(tiny_qwen2, tmp_path / "tied", 0.3, seed=7, r=4, lora_alpha=8,
                              target_modules=targets, ensure_weight_tying=True)}
    check_mixed_batch(tiny_qwen2, dirs, vocab=500)


def test_vocab_adapters_change_what_they_adapt(tiny_llama, tmp_path, save_lora):
    """The check above would pass if the vocabulary LoRAs were skipped and peft's were no-ops:
    each must move its adapter's logits away from the base model's."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32"), progress=False)
    prompt = list(range(5, 25))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)

    def logprobs(adapter):
        req = engine.add_request(prompt, params, adapter=adapter)
        while engine.has_unfinished:
            engine.step()
        return torch.tensor([lp for lp, _ in req.logprobs])

    base = logprobs(None)
    for i, (name, target) in enumerate((("embed", "embed_tokens"), ("head", "lm_head"))):
        engine.add_adapter(name, save_lora(tiny_llama, tmp_path / name, 0.3, seed=i, r=4, lora_alpha=8,
                                           target_modules=[target]))
        assert not torch.allclose(logprobs(name), base, atol=1e-3), f"{target}'s LoRA changed nothing"


def test_a_vocabulary_trained_with_the_adapter_is_refused(tiny_qwen2, tmp_path, save_lora):
    """peft saves the (tied) embedding beside its LoRA and loads it over the base model's: a copy
    that differs from the base is a vocabulary the shared base does not have."""
    from safetensors.torch import load_file, save_file

    path = save_lora(tiny_qwen2, tmp_path / "a", 0.3, seed=1, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    tensors = load_file(path / "adapter_model.safetensors")
    copies = [k for k in tensors if k.endswith("base_layer.weight")]
    assert copies, "peft no longer saves the embedding beside its LoRA: nothing here is checked"
    engine = LLMEngine(EngineConfig(model=str(tiny_qwen2), dtype="bfloat16"), progress=False)
    engine.add_adapter("same", path)  # the copy in fp32, the base in bf16: equal after the cast
    for k in copies:
        tensors[k][7] += 0.5
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="embed_tokens.base_layer.* differs from the base model's"):
        engine.add_adapter("trained", path)


def test_dora_on_the_vocabulary_is_refused(tiny_llama, tmp_path, save_lora):
    path = save_lora(tiny_llama, tmp_path / "a", 0.3, seed=1, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                     use_dora=True)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32"), progress=False)
    with pytest.raises(AdapterError, match="use_dora or lora_bias on embed_tokens or lm_head"):
        engine.add_adapter("a", path)


@pytest.mark.slow
def test_vocab_adapters_match_peft_on_smollm2(real_model_dir, tmp_path, save_lora):
    """A real tied head over 49k tokens. (Gemma 3 270M's 262k would cost the suite 4 GB more
    at its peak, in fp32 vocabulary stacks and peft's copies of the embedding; the tiny Gemma
    models above check its scaled embedding.)"""
    dirs = {name: save_lora(real_model_dir, tmp_path / name, 0.02, seed=50 + i, r=r, lora_alpha=2 * r,
                            target_modules=t) for i, (name, r, t) in enumerate(RECIPES[:3])}
    check_mixed_batch(real_model_dir, dirs, vocab=49152, logprob_atol=2e-3)


def test_a_slot_reused_after_a_vocab_adapter_keeps_none_of_it(tiny_llama, tmp_path, save_lora):
    """Two slots: the vocabulary adapter's is taken over by a plain adapter, which then runs
    in one step beside an embedding adapter (so the step runs the embedding LoRA over every
    slot's rows). Its output must equal that on an engine whose slots never held the
    vocabulary adapter: the taken-over slot's embedding and head stacks were cleared."""
    dirs = {name: save_lora(tiny_llama, tmp_path / name, 0.3, seed=60 + i, r=4, lora_alpha=8, target_modules=t)
            for i, (name, _, t) in enumerate(RECIPES)}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)

    def run(engine, adapters):
        reqs = [engine.add_request(list(range(5 + i, 30)), params, adapter=a) for i, a in enumerate(adapters)]
        while engine.has_unfinished:
            engine.step()
        return [(r.output_token_ids, [lp for lp, _ in r.logprobs]) for r in reqs]

    reused, fresh = (LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_loras=2), progress=False)
                     for _ in range(2))
    for engine in (reused, fresh):
        for name, path in dirs.items():
            engine.add_adapter(name, path)
    run(reused, ["vocab"])
    run(reused, ["embed"])  # the least recently used slot is now the vocabulary adapter's
    assert run(reused, ["attn", "embed"]) == run(fresh, ["attn", "embed"])
