"""load_adapter against adapters written by peft: the same modules, the same A, the same
scaled B, and the same delta weight peft itself computes after reloading the directory."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loragate.adapters.errors import AdapterError
from loragate.adapters.loader import WEIGHTS_FILE, LoraWeights, load_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "attention_r4": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "mlp_r8_alpha3": dict(r=8, lora_alpha=3, target_modules=MLP),
    "all_linear_rslora": dict(r=16, lora_alpha=5, use_rslora=True, target_modules="all-linear"),
    "regex": dict(r=2, lora_alpha=7, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"),
    "layers_to_transform": dict(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "layer_int_with_pattern": dict(r=3, lora_alpha=4, target_modules=ATTN, layers_to_transform=0, layers_pattern="layers"),
    "dotted_suffixes": dict(r=4, lora_alpha=8, target_modules=["self_attn.k_proj", "mlp.up_proj"]),
    # peft: an exact full name is not filtered by layers_to_transform, a short name is.
    "full_name_and_layers": dict(r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.o_proj", "v_proj"],
                                 layers_to_transform=[1]),
    "exclude_modules": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    "rank1_float_alpha": dict(r=1, lora_alpha=0.5, target_modules=["v_proj"]),
}


def _check_against_peft(weights: LoraWeights, model, lora_layers) -> None:
    layers = lora_layers(model)
    assert set(weights.modules) == set(layers), "targets differ from the modules peft wrapped"
    for key, (a, b) in weights.modules.items():
        layer = layers[key]
        assert a.dtype == b.dtype == torch.float32
        assert a.shape == (weights.rank, layer.in_features) and b.shape == (layer.out_features, weights.rank)
        torch.testing.assert_close(a, layer.lora_A["default"].weight.float(), rtol=0, atol=0)
        torch.testing.assert_close(b, layer.lora_B["default"].weight.float() * layer.scaling["default"])
        delta = layer.get_delta_weight("default")  # peft's own B @ A * scaling, in the adapter's dtype
        tol = {} if delta.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(b @ a, delta.float(), **tol)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_matches_peft(tmp_path, variant, arch, save_peft, lora_layers):
    model = save_peft(tmp_path, PeftLoraConfig(**VARIANTS[variant]))
    weights = load_adapter(tmp_path, arch, max_lora_rank=16)
    assert weights.rank == VARIANTS[variant]["r"]
    _check_against_peft(weights, model, lora_layers)
    assert weights.num_bytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in weights.modules.values())


def test_rslora_scaling_is_alpha_over_sqrt_r(tmp_path, arch, save_peft):
    save_peft(tmp_path, PeftLoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert load_adapter(tmp_path, arch, 16).config.scaling_of(0, "q_proj") == pytest.approx(8 / 4)


def test_bf16_adapter_is_converted_to_fp32(tmp_path, arch, save_peft, lora_layers):
    # peft upcasts adapter weights to fp32 by default even on a bf16 base; without that the
    # file holds BF16 tensors.
    model = save_peft(tmp_path, PeftLoraConfig(r=4, target_modules=ATTN), dtype=torch.bfloat16,
                      autocast_adapter_dtype=False)
    weights = load_adapter(tmp_path, arch, 16)
    assert {t.dtype for t in load_file(tmp_path / WEIGHTS_FILE).values()} == {torch.bfloat16}
    _check_against_peft(weights, model, lora_layers)


def test_fan_in_fan_out_true_on_llama_means_what_peft_does(tmp_path, arch, save_peft, hf_llama):
    # peft saves fan_in_fan_out=false for Llama (it resets it on nn.Linear), so write true by
    # hand: peft reloads it as false and lora_A/B are never transposed.
    save_peft(tmp_path, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False
    cfg["fan_in_fan_out"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_adapter(tmp_path, arch, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(hf_llama(), str(tmp_path))
    for (layer, name), (a, b) in weights.modules.items():
        parent = "self_attn" if name == "q_proj" else "mlp"
        module = getattr(getattr(peft_model.base_model.model.model.layers[layer], parent), name)
        torch.testing.assert_close(b @ a, module.get_delta_weight("default"))


@pytest.mark.parametrize("rename", [
    lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
    lambda k: k.removeprefix("base_model.model."),
    lambda k: k.removeprefix("base_model.model.model."),
], ids=["adapter_name_infix", "no_peft_prefix", "bare_layers"])
def test_key_spellings(tmp_path, arch, save_peft, lora_layers, rename):
    model = save_peft(tmp_path, PeftLoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    save_file({rename(k): v for k, v in tensors.items()}, tmp_path / WEIGHTS_FILE)
    _check_against_peft(load_adapter(tmp_path, arch, 16), model, lora_layers)


def test_base_model_name_checked_only_when_strict(tmp_path, arch, save_peft):
    save_peft(tmp_path, PeftLoraConfig(r=4, target_modules=["q_proj"]))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    load_adapter(tmp_path, arch, 16, base_model_name="meta-llama/Llama-3.2-1B")  # advisory
    load_adapter(tmp_path, arch, 16, base_model_name="huggingfacetb/smollm2-135m-instruct/", strict_base_model=True)
    with pytest.raises(AdapterError) as e:
        load_adapter(tmp_path, arch, 16, base_model_name="meta-llama/Llama-3.2-1B", strict_base_model=True)
    assert e.value.code == "base_model_mismatch" and "SmolLM2-135M-Instruct" in str(e.value)


def test_rank_equal_to_max_is_accepted(tmp_path, arch, save_peft):
    save_peft(tmp_path, PeftLoraConfig(r=8, target_modules=["q_proj"]))
    assert load_adapter(tmp_path, arch, max_lora_rank=8).rank == 8
    with pytest.raises(AdapterError) as e:
        load_adapter(tmp_path, arch, max_lora_rank=7)
    assert e.value.code == "rank_too_large"


def test_corruption_never_escapes_as_a_raw_exception(tmp_path, arch, save_peft):
    save_peft(tmp_path / "good", PeftLoraConfig(r=2, target_modules=["q_proj"]))
    data = (tmp_path / "good" / WEIGHTS_FILE).read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_bytes((tmp_path / "good" / "adapter_config.json").read_bytes())
    gen = torch.Generator().manual_seed(0)
    cases = [data[:n] for n in range(0, len(data), max(1, len(data) // 40))]  # truncations
    for _ in range(40):  # random byte flips in the header, where structure lives
        flipped = bytearray(data)
        i = int(torch.randint(0, min(len(data), 400), (1,), generator=gen))
        flipped[i] = (flipped[i] + int(torch.randint(1, 256, (1,), generator=gen))) % 256
        cases.append(bytes(flipped))
    for blob in cases:
        (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(blob)
        try:
            load_adapter(tmp_path / "bad", arch, 16)
        except AdapterError:
            pass  # any other exception type fails the test
