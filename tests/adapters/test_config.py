"""LoraConfig parsing: what is accepted as-is, what is refused, and how targets resolve.
Resolution is also checked against peft's own matching in test_loader.py."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig as PeftLoraConfig

from loragate.adapters.config import LoraConfig
from loragate.adapters.errors import AdapterError


def base(**changes) -> dict:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **changes}


def code_of(d: dict) -> str:
    with pytest.raises(AdapterError) as e:
        LoraConfig.from_dict(d).targets(2)
    return e.value.code


def test_every_key_peft_writes_is_understood(tmp_path):
    # The full config peft 0.21 saves (dropout, task_type, loftq_config, ...) parses as-is.
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft_config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {"lora_dropout", "task_type", "inference_mode", "peft_version", "loftq_config"} <= raw.keys()
    cfg = LoraConfig.from_file(tmp_path / "adapter_config.json")
    assert (cfg.r, cfg.lora_alpha, cfg.scaling_of(0, "q_proj"), cfg.target_modules) == (4, 8.0, 2.0, ("q_proj",))


def test_scaling():
    assert LoraConfig.from_dict(base()).scaling_of(0, "q_proj") == 2.0
    assert LoraConfig.from_dict(base(r=16, lora_alpha=8, use_rslora=True)).scaling_of(0, "q_proj") == 2.0


def test_per_module_rank_and_alpha_follow_the_first_matching_pattern():
    """peft's get_pattern_key: a pattern matches the end of the module's full name, after a dot."""
    cfg = LoraConfig.from_dict(base(r=8, lora_alpha=16, rank_pattern={r"layers\.1\..*_proj": 2, "q_proj": 4},
                                    alpha_pattern={"proj": 1, "v_proj": 64}))
    assert (cfg.rank_of(0, "q_proj"), cfg.rank_of(1, "q_proj"), cfg.rank_of(0, "v_proj")) == (4, 2, 8)
    assert cfg.max_rank == 8
    assert cfg.scaling_of(0, "v_proj") == 64 / 8  # "proj" is not a whole name part: no match
    assert cfg.scaling_of(0, "q_proj") == 16 / 4


def test_unknown_keys_are_ignored_only_when_unset():
    LoraConfig.from_dict(base(some_new_option=None, another=False, third={}))
    assert code_of(base(some_new_option="on")) == "unsupported_adapter"


@pytest.mark.parametrize("changes, targets", [
    (dict(target_modules="all-linear"), 14),
    (dict(target_modules="ALL-LINEAR", exclude_modules=r".*\.mlp\..*"), 8),
    (dict(target_modules=["q_proj"], layers_to_transform=[]), 2),  # peft: an empty list means every layer
    (dict(target_modules=["q_proj", "up_proj"], layers_to_transform=1), 2),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["blocks", "layers"]), 1),
])
def test_targets(changes, targets):
    assert len(LoraConfig.from_dict(base(**changes)).targets(2)) == targets


@pytest.mark.parametrize("changes, code", [
    (dict(peft_type="LOHA"), "unsupported_adapter"),
    (dict(peft_type=None), "invalid_config"),
    (dict(r=0), "invalid_config"),
    (dict(r=True), "invalid_config"),
    (dict(lora_alpha=float("nan")), "invalid_config"),
    (dict(use_rslora="yes"), "invalid_config"),
    (dict(target_modules=None), "invalid_config"),
    (dict(target_modules=[]), "invalid_config"),
    (dict(target_modules="(unclosed"), "invalid_config"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "invalid_config"),
    (dict(layers_to_transform=[-1]), "invalid_config"),
    (dict(layers_to_transform=[0], layers_pattern="(idx"), "invalid_config"),
    (dict(layers_to_transform=[0], layers_pattern="h"), "unknown_target_module"),  # GPT-2 style layer names
    (dict(exclude_modules=["q_proj", "v_proj"]), "unknown_target_module"),
    (dict(lora_bias=True, use_dora=True), "unsupported_adapter"),
    (dict(lora_bias="yes"), "invalid_config"),
    (dict(alpha_pattern={"q_proj": "4"}), "invalid_config"),
    (dict(rank_pattern=["q_proj", 4]), "invalid_config"),
    (dict(init_lora_weights="olora"), "unsupported_adapter"),
    (dict(trainable_token_indices=[1, 2]), "unsupported_adapter"),
    (dict(target_parameters="gate_up_proj"), "invalid_config"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), "unknown_target_module"),  # a dense model
    (dict(target_modules=[], target_parameters=["gate.weight"], use_dora=True), "unsupported_adapter"),
])
def test_refused(changes, code):
    assert code_of(base(**changes)) == code


def test_target_parameters_resolve_as_peft_matches_them():
    """On a sparse-expert model: an entry equal to a parameter's full name, or ending it after a
    dot; layers_to_transform does not apply to them (peft's _inject_parameters)."""
    from dataclasses import replace

    moe = (("experts.gate_up_proj", "mlp"), ("experts.down_proj", "mlp"), ("gate.weight", "mlp"))
    cfg = replace(LoraConfig.from_dict(base(target_modules=[], layers_to_transform=[0],
                                            target_parameters=["down_proj", "model.layers.1.mlp.gate.weight"])),
                  parameters=moe)
    assert cfg.targets(2) == {(0, "experts.down_proj"), (1, "experts.down_proj"), (1, "gate.weight")}
    assert cfg.scaling_of(1, "gate.weight") == 2.0
    with pytest.raises(AdapterError, match=r"\['experts.w1'\] match no parameter.*experts.gate_up_proj, "
                                           r"experts.down_proj, gate.weight in layers 0..1"):
        replace(LoraConfig.from_dict(base(target_parameters=["experts.w1"])), parameters=moe).targets(2)


def test_transformers_4_expert_targets_become_target_parameters():
    """peft's conversion of a transformers 4 MoE adapter's config: the experts' and router's
    linears become the parameters holding them, gate and up (fused) at twice the rank and
    alpha; one of them alone is refused; a regex stands for the names it matches (peft's
    resolution), and one that names no expert stays a regex."""
    from dataclasses import replace
    from types import SimpleNamespace

    from loragate.adapters.moe_adapters import on_stacked_experts

    qwen = SimpleNamespace(model_type="qwen3_moe", num_layers=2)
    mixtral = SimpleNamespace(model_type="mixtral", num_layers=2)
    moe = dict(linears=(("q_proj", "self_attn"), ("o_proj", "self_attn")),
               parameters=(("experts.gate_up_proj", "mlp"), ("experts.down_proj", "mlp"), ("gate.weight", "mlp")))
    cfg = on_stacked_experts(replace(LoraConfig.from_dict(base(target_modules=["q_proj", "gate_proj", "up_proj",
                                                                               "down_proj"])), **moe), qwen)
    assert (cfg.target_modules, cfg.target_parameters) == (("q_proj",), ("experts.down_proj", "experts.gate_up_proj"))
    assert (cfg.rank_of(0, "experts.gate_up_proj"), cfg.rank_of(0, "experts.down_proj")) == (16, 8)
    assert cfg.scaling_of(0, "experts.gate_up_proj") == cfg.scaling_of(0, "experts.down_proj") == 2.0
    with pytest.raises(AdapterError, match=r"rank_pattern's 16 \(peft doubles r for a sparse-expert model's fused"):
        cfg.check_rank(8)
    assert len(cfg.targets(2)) == 2 + 4
    everything = on_stacked_experts(replace(LoraConfig.from_dict(base(target_modules="all-linear")), **moe), mixtral)
    assert everything.target_parameters == ("experts.down_proj", "experts.gate_up_proj", "gate.weight")
    assert everything.target_modules == ("o_proj", "q_proj")
    attention = replace(LoraConfig.from_dict(base(target_modules=r".*layers\.1\.self_attn\.q_proj")), **moe)
    assert on_stacked_experts(attention, mixtral) == attention  # names no expert: a regex as before
    regex = on_stacked_experts(replace(LoraConfig.from_dict(base(target_modules=r".*\.(o_proj|w1|w3|gate)")), **moe),
                               mixtral)
    assert (regex.target_modules, regex.target_parameters) == (("o_proj",), ("experts.gate_up_proj", "gate.weight"))
    with pytest.raises(AdapterError, match=r"targets \['w1'\] of the experts but not \['w3'\]"):
        on_stacked_experts(replace(LoraConfig.from_dict(base(target_modules=["w1", "w2"])), **moe), mixtral)


def test_accepted_inits():
    for init in (True, False, "gaussian", "eva", "orthogonal"):
        LoraConfig.from_dict(base(init_lora_weights=init))


def test_from_file_errors(tmp_path):
    with pytest.raises(AdapterError) as e:
        LoraConfig.from_file(tmp_path / "adapter_config.json")
    assert e.value.code == "missing_file"
    (tmp_path / "big.json").write_text(" " * (2 << 20))
    with pytest.raises(AdapterError) as e:
        LoraConfig.from_file(tmp_path / "big.json")
    assert e.value.code == "too_large"
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(AdapterError) as e:
        LoraConfig.from_file(tmp_path / "list.json")
    assert e.value.code == "invalid_config"


def test_check_rank_and_base_model():
    cfg = LoraConfig.from_dict(base(base_model_name_or_path="org/model"))
    cfg.check_rank(8)
    with pytest.raises(AdapterError):
        cfg.check_rank(7)
    cfg.check_base_model("org/other", strict=False)
    cfg.check_base_model("ORG/model/", strict=True)
    with pytest.raises(AdapterError) as e:
        cfg.check_base_model("org/other", strict=True)
    assert e.value.code == "base_model_mismatch"
    LoraConfig.from_dict(base()).check_base_model("org/other", strict=True)  # no name recorded: nothing to compare


@pytest.mark.parametrize("changes, vocab_targets", [
    (dict(target_modules=["q_proj", "embed_tokens", "lm_head"]), {"embed_tokens", "lm_head"}),
    # peft 0.21 on a Llama: an exact full name ignores layers_to_transform, a suffix match needs a layer
    (dict(target_modules=["q_proj", "embed_tokens", "lm_head"], layers_to_transform=[0]), {"lm_head"}),
    (dict(target_modules="all-linear"), set()),  # every linear but the output layer
    (dict(target_modules=r".*(q_proj|lm_head)"), {"lm_head"}),
    (dict(target_modules=["q_proj", "embed_tokens"], exclude_modules=["embed_tokens"]), set()),
])
def test_vocabulary_targets_as_peft_selects_them(changes, vocab_targets):
    targets = LoraConfig.from_dict(base(**changes)).targets(2)
    assert {name for layer, name in targets if layer == -1} == vocab_targets
