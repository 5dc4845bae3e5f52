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
])
def test_refused(changes, code):
    assert code_of(base(**changes)) == code


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
