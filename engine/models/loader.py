"""Build our model from a Hugging Face model directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelConfigError
from .gemma import GemmaForCausalLM
from .arch import ModelArchConfig, projection_biases, text_config
from .llama import LlamaForCausalLM
from .olmo2 import Olmo2ForCausalLM
from .starcoder2 import Starcoder2ForCausalLM


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelConfigError(f"{model_dir} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"cannot read {model_dir / 'config.json'}: {e}") from e


def _checkpoint_tensors(model_dir: Path):
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"{model_dir} has no *.safetensors weights (pickle checkpoints are not loaded)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _language_model_name(name: str, prefixes: tuple[str, ...]) -> str:
    """A checkpoint tensor's name relative to the language model ("layers.3.mlp.up_proj.weight")."""
    name = name.removeprefix("language_model.") if name.startswith("language_model.lm_head.") else name
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _num_norm_tensors(norm) -> int:
    return 1 + (getattr(norm, "bias", None) is not None)


def load_model(model_dir: Path, dtype: torch.dtype, max_positions: int, int4: bool = False,
               device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, object]:
    model_dir = Path(model_dir)
    hf_config = load_hf_config(model_dir)
    arch = ModelArchConfig.from_hf(hf_config)
    model_class = (GemmaForCausalLM if arch.is_gemma else Olmo2ForCausalLM if arch.is_olmo
                   else Starcoder2ForCausalLM if arch.plain_mlp else LlamaForCausalLM)
    model = model_class(arch, text_config(hf_config), dtype, max_positions)
    layers = model.layers
    # Checkpoint module ("self_attn.q_proj") -> (our projection, its slice).
    linears = {f"{m.parent}.{name}": (m.projection, name) for name, m in arch.linear_modules.items()}
    loaded: set[str] = set()
    for name, tensor in _checkpoint_tensors(model_dir):
        if name.startswith(arch.skipped_prefixes):
            continue
        name = _language_model_name(name, arch.module_prefixes)
        if name == "embed_tokens.weight":
            target = model.embed_tokens.weight
        elif name in ("norm.weight", "norm.bias") and getattr(model.norm, name[5:], None) is not None:
            target = getattr(model.norm, name[5:])  # a LayerNorm (StarCoder2) has a bias
        elif name == "lm_head.weight":
            if model.lm_head is None:
                continue  # tied: the embedding serves as the head
            target = model.lm_head
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            layer = layers[int(idx)]
            module, _, kind = rest.rpartition(".")
            expert = layer.moe.checkpoint_tensor(module) if getattr(layer, "moe", None) is not None else None
            if module in layer.NORMS and getattr(getattr(layer, layer.NORMS[module]), kind, None) is not None:
                target = getattr(getattr(layer, layer.NORMS[module]), kind)
            elif expert is not None and kind == "weight":
                target = expert
            elif module in linears and kind in ("weight", "bias"):
                proj_name, slice_name = linears[module]
                proj = getattr(layer, proj_name)
                full = getattr(proj, kind)
                if full is None:
                    raise ModelConfigError(f"checkpoint has {name} but the config says the projection has no bias")
                start, end = proj.slice_range(slice_name)
                target = full[start:end]
            elif "rotary_emb" in rest:
                continue
            else:
                raise ModelConfigError(f"unexpected tensor {name!r} in checkpoint")
        else:
            raise ModelConfigError(f"unexpected tensor {name!r} in checkpoint")
        if target.shape != tensor.shape:
            raise ModelConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}")
        target.copy_(tensor)
        loaded.add(name)
    biases = projection_biases(arch)
    per_layer = sum(_num_norm_tensors(getattr(layers[0], attr)) for attr in layers[0].NORMS.values())
    per_layer += sum(1 + biases.get(m.projection, False) for m in arch.linear_modules.values())
    per_layer += layers[0].moe.num_checkpoint_tensors if arch.is_moe else 0
    expected = 1 + _num_norm_tensors(model.norm) + arch.num_layers * per_layer + (0 if arch.tie_word_embeddings else 1)
    if len(loaded) != expected:
        raise ModelConfigError(f"checkpoint in {model_dir} holds {len(loaded)} of the {expected} tensors the model needs")
    if torch.device(device).type != "cpu":  # read on the host, then moved once
        model.move_to(torch.device(device))
    model.pack_weights(int4)
    return model, hf_config
