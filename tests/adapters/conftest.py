"""Real adapters written by peft itself on a tiny random Llama, so the loader is checked
against the format peft actually saves, not against our idea of it."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _tiny_hf_llama(hidden_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size})
    return LlamaForCausalLM(cfg).to(dtype)


def _tiny_arch(hidden_size: int = 64):
    from transformers import LlamaConfig

    from loragate.engine.models.arch import ModelArchConfig

    return ModelArchConfig.from_hf(LlamaConfig(**{**TINY, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}))


def _save_peft_adapter(path, peft_config, *, hidden_size: int = 64, dtype: torch.dtype = torch.float32,
                      seed: int = 0, **peft_kwargs):
    """get_peft_model + random non-zero lora_B (peft initialises B to zeros, which would hide
    a swapped or missing B) + save_pretrained. Returns the PeftModel."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_tiny_hf_llama(hidden_size, seed, dtype), peft_config, **peft_kwargs)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
        model.save_pretrained(str(path))
    return model


def _peft_lora_layers(model) -> dict:
    """(layer, module name) -> peft's LoraLayer, for every module peft wrapped."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
            out[(int(m[1]), m[2])] = module
    return out


# Helpers reach the tests as fixtures: with --import-mode=importlib a test module cannot
# import a sibling helper module.
@pytest.fixture(scope="session")
def arch():
    return _tiny_arch()


@pytest.fixture(scope="session")
def hf_llama():
    return _tiny_hf_llama


@pytest.fixture(scope="session")
def make_arch():
    return _tiny_arch


@pytest.fixture(scope="session")
def save_peft():
    return _save_peft_adapter


@pytest.fixture(scope="session")
def lora_layers():
    return _peft_lora_layers


def edit_config(d: Path, **changes) -> None:
    """Rewrite an adapter's adapter_config.json with some fields changed."""
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(d: Path, fn) -> None:
    """Apply fn to the adapter's tensors (a dict) and save them back."""
    from safetensors.torch import load_file, save_file

    from loragate.adapters.loader import WEIGHTS_FILE

    tensors = load_file(d / WEIGHTS_FILE)
    fn(tensors)
    save_file(tensors, d / WEIGHTS_FILE)


def poison(key, value):
    """An edit_weights function that puts `value` (NaN, inf...) into tensor `key`."""
    def fn(t):
        t[key] = t[key].clone()
        t[key].view(-1)[1] = value
    return fn
