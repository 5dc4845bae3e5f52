"""Bad input gets a clear exception naming the problem, and the engine keeps serving."""

from __future__ import annotations

import pytest

from loragate.engine import EngineConfig, InvalidRequestError, LLMEngine, ModelConfigError, SamplingParams
from loragate.engine.models.prepare import ModelPrepareError


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", max_model_len=128), progress=False)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)


@pytest.mark.parametrize("prompt, fragment", [
    ([], "empty"),
    ("", "empty"),
    (list(range(3, 131)), "context is 128 tokens"),
    ([5, 99999], "token ids must be"),
    ([5, -1], "token ids must be"),
])
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(engine, prompt, fragment):
    good = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(InvalidRequestError, match=fragment):
        engine.add_request(prompt, SamplingParams(max_tokens=3))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == [good.request_id]
    assert len(outs[-1].token_ids) == 3


def test_max_tokens_past_the_context_is_refused_and_up_to_it_runs(engine):
    with pytest.raises(InvalidRequestError, match="context is 128 tokens.*129 .120 in the prompt") as e:
        engine.add_request(list(range(3, 123)), SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    assert e.value.param == "max_tokens" and not engine.has_unfinished
    req = engine.add_request(list(range(3, 123)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert outs[-1].finish_reason == "length"
    assert req.num_tokens == 128


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPrepareError, match="no-such-model"):
        LLMEngine(EngineConfig(model="no-such-model"), progress=False)
    with pytest.raises((ModelPrepareError, ModelConfigError), match="config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path)), progress=False)


@pytest.mark.parametrize("field, value", [("dtype", "int3"), ("block_size", 0), ("max_num_seqs", 0),
                                          ("kv_cache_memory", "lots"), ("kv_cache_memory", "lots%"),
                                          ("kv_cache_memory", "0%"), ("kv_cache_memory", "99%"), ("kv_cache_memory", "nan%"),
                                          ("max_model_len", 1), ("max_cpu_lora_memory", "8 gigs"),
                                          ("max_cpu_lora_memory", -1)])
def test_bad_engine_config(field, value):
    with pytest.raises(ModelConfigError, match=field.split("_")[0]):
        EngineConfig(**{field: value})


def test_sliding_windows_follow_the_config_and_unsupported_variants_are_refused():
    """Windows as transformers applies them (Mistral: every layer; Qwen2/Qwen3: per
    layer_types), multimodal Gemma 3 read as its language model, and one clear error for what
    the decoder does not compute."""
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig, MistralConfig, Qwen2Config, SmolLM3Config

    from loragate.engine.models.arch import ModelArchConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    assert ModelArchConfig.from_hf(MistralConfig(**small, sliding_window=64)).layer_windows == (64, 64, 64)
    assert ModelArchConfig.from_hf(MistralConfig(**small, sliding_window=None)).layer_windows == ()
    qwen2 = Qwen2Config(**small, use_sliding_window=True, sliding_window=32, max_window_layers=2)
    assert ModelArchConfig.from_hf(qwen2).layer_windows == (None, None, 32)
    assert ModelArchConfig.from_hf(Qwen2Config(**small)).layer_windows == ()
    smollm3 = dict(small, sliding_window=16, no_rope_layer_interval=3)  # the third layer without RoPE
    assert ModelArchConfig.from_hf(SmolLM3Config(**smollm3)).layer_windows == ()  # use_sliding_window is off
    windowed = ModelArchConfig.from_hf(SmolLM3Config(**smollm3, use_sliding_window=True))
    assert windowed.layer_windows == (None, None, 16) and windowed.nope_layers == (2,)
    gemma = dict(small, head_dim=16, sliding_window=8)
    assert ModelArchConfig.from_hf(Gemma3TextConfig(**gemma)).layer_windows == (8, 8, 8)  # 6-layer pattern
    multimodal = ModelArchConfig.from_hf(Gemma3Config(text_config=gemma))  # served text-only
    assert multimodal.is_gemma3 and multimodal.layer_windows == (8, 8, 8) and "fc1" in multimodal.foreign_modules
    capped = ModelArchConfig.from_hf(Gemma2Config(**gemma, layer_types=["sliding_attention", "full_attention",
                                                                        "sliding_attention"]))
    assert capped.layer_windows == (8, None, 8) and (capped.attention_softcap, capped.logit_softcap) == (50.0, 30.0)
    assert not capped.qk_norm and capped.is_gemma and not capped.is_gemma3
    for config, message in [(Gemma3TextConfig(**gemma, hidden_activation="relu"), "hidden_activation"),
                            (Gemma2Config(**gemma, use_bidirectional_attention=True), "bidirectional"),
                            (Gemma2Config(**gemma, layer_types=["chunked_attention"] * 3), "layer types")]:
        with pytest.raises(ModelConfigError, match=message):
            ModelArchConfig.from_hf(config)


def test_starcoder2_reads_its_names_and_refuses_other_activations():
    from transformers import Starcoder2Config

    from loragate.engine.models.arch import ModelArchConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, sliding_window=4096, norm_epsilon=1e-5)
    arch = ModelArchConfig.from_hf(Starcoder2Config(**small))
    assert arch.plain_mlp and arch.qkv_bias and arch.o_bias and arch.mlp_bias and arch.rms_norm_eps == 1e-5
    assert arch.layer_windows == (4096, 4096)
    assert {n: (m.parent, m.projection) for n, m in arch.linear_modules.items() if m.parent == "mlp"} == {
        "c_fc": ("mlp", "up_proj"), "c_proj": ("mlp", "down_proj")}
    assert not ModelArchConfig.from_hf(Starcoder2Config(**small, use_bias=False)).mlp_bias
    with pytest.raises(ModelConfigError, match="hidden_act 'relu' is not supported"):
        ModelArchConfig.from_hf(Starcoder2Config(**small, hidden_act="relu"))


def test_phi3_rope_variants_and_what_other_families_refuse():
    """LongRoPE and partial rotary dims, as transformers implements them for Phi-3 only; a
    LongRoPE model has max_position_embeddings positions, and serves original_max_position_embeddings
    of them (its short factors) unless asked for more (see test_model_vs_hf)."""
    from transformers import LlamaConfig, Phi3Config

    from loragate.engine.models.arch import ModelArchConfig, context_limit

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    phi3_hf = Phi3Config(**small, max_position_embeddings=8192, original_max_position_embeddings=4096,
                         rope_parameters=longrope)
    phi3 = ModelArchConfig.from_hf(phi3_hf)
    assert phi3.fused_linears and phi3.max_position_embeddings == 8192
    assert [context_limit(phi3_hf, n)[0] for n in (None, 1000, 6000, 9000)] == [4096, 1000, 6000, 8192]
    assert list(phi3.linear_modules) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert phi3.linear_modules["qkv_proj"].fan_out == 3 * 64 and phi3.linear_modules["gate_up_proj"].fan_out == 256
    plain_hf = Phi3Config(**small, max_position_embeddings=4096)  # Phi-3-mini-4k
    plain = ModelArchConfig.from_hf(plain_hf)
    assert plain.max_position_embeddings == 4096 and plain.layer_windows == () and context_limit(plain_hf, None)[0] == 4096
    for config, message in [(Phi3Config(**small, hidden_act="gelu"), "hidden_act"),
                            (LlamaConfig(**small, rope_parameters=dict(longrope, original_max_position_embeddings=4096)),
                             r"rope_type 'longrope' is not supported \(supported: default, linear, llama3, yarn\)"),
                            (LlamaConfig(**small, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                   "partial_rotary_factor": 0.5}),
                             "partial_rotary_factor is not supported for model_type 'llama'")]:
        with pytest.raises(ModelConfigError, match=message):
            ModelArchConfig.from_hf(config)


def test_qwen3_moe_with_dense_layers_is_refused():
    from transformers import Qwen3MoeConfig

    from loragate.engine.models.arch import ModelArchConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    assert ModelArchConfig.from_hf(Qwen3MoeConfig(**small)).is_moe
    for dense in (dict(mlp_only_layers=[0]), dict(decoder_sparse_step=2)):
        with pytest.raises(ModelConfigError, match="every layer must be sparse"):
            ModelArchConfig.from_hf(Qwen3MoeConfig(**small, **dense))


def test_kv_cache_memory_as_a_share_of_free_memory(tiny_llama, monkeypatch):
    """'N%': the KV cache takes N% of the memory free once the model and LoRA slots are in
    (the GPU's on CUDA, MemAvailable on the CPU), measured after both are loaded."""
    from loragate.adapters.pool import LoraSlotPool
    from loragate.engine import config as engine_config
    from loragate.engine.model_runner import ModelRunner

    assert EngineConfig(kv_cache_memory="85%").kv_cache_memory == 0.85
    assert EngineConfig(kv_cache_memory="2GiB").kv_cache_memory == 2 << 30
    events = []
    real_init = LoraSlotPool.__init__
    monkeypatch.setattr(LoraSlotPool, "__init__", lambda self, *a, **k: events.append("slots") or real_init(self, *a, **k))
    monkeypatch.setattr(engine_config, "free_memory", lambda device: events.append(f"free {device.type}") or 3 << 30)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory="1%"), progress=False)
    assert events == ["slots", f"free {engine.device.type}"]
    per_block = ModelRunner.bytes_per_block(engine.model, 16, engine.kv.layout)
    assert engine.kv.num_blocks == int(0.01 * (3 << 30)) // per_block
    monkeypatch.undo()
    assert engine_config.free_memory(engine.device) > 0  # read for real (MemAvailable or the GPU's)
