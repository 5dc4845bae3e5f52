"""Load a PEFT LoRA adapter directory into the fp32 A/B pairs the slot pool copies from.

Only `adapter_model.safetensors` is ever read: pickle formats (`adapter_model.bin`, .pt)
can run code when loaded, so their presence alone is an error. Everything that could make
the engine compute something other than what peft computes on the HF model is refused
with an AdapterError naming the file, key or module, and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import LoraConfig
from .errors import AdapterError
from .module_names import VOCAB_LAYER, VOCAB_MODULES
from .moe_adapters import normalized_key, parse_per_expert_key, stacked_pair

if TYPE_CHECKING:
    from loragate.engine.models.arch import ModelArchConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_MAX_ADAPTER_BYTES = 2 << 30  # a rank-64 all-linear LoRA of an 8B model is ~0.7 GB in fp32
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# peft saves "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"; state_dict()
# dumps and other tools add the adapter name ("lora_A.default.weight") or drop the prefix.
_LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.weight")
# lora_bias=true: "...q_proj.lora_B.bias".
_BIAS_KEY = re.compile(r"(?P<path>.+)\.(?P<kind>lora_B)(?:\.[\w-]+)?\.bias")
# DoRA's per-output-row magnitude: "...q_proj.lora_magnitude_vector" as peft saves it.
_MAGNITUDE_KEY = re.compile(r"(?P<path>.+)\.(?P<kind>lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?")
# An embedding LoRA (embed_tokens): "...embed_tokens.lora_embedding_A", no ".weight".
_EMBEDDING_KEY = re.compile(r"(?P<path>.+)\.lora_embedding_(?P<kind>A|B)(?:\.[\w-]+)?")
# peft saves the base embedding and head beside their LoRA (save_embedding_layers="auto"), and
# loads them over the base model's: "...lm_head.base_layer.weight".
_BASE_COPY_KEY = re.compile(r"(?P<path>.+)\.base_layer\.weight")
_KEY_HINTS = (("base_layer", "a copy of a base weight"), (".bias", "a bias"))


def _module_path_regex(prefixes: tuple[str, ...]) -> re.Pattern:
    """A LoRA key's module path: "base_model.model." (peft's wrapper), then one of the base
    model's prefixes for its decoder layers (or none), then layers.N.parent.module."""
    alternatives = "|".join(re.escape(p) for p in prefixes)
    return re.compile(rf"(?:base_model\.model\.)?(?:{alternatives})?layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)")


def module_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear module of the base model, and
    of its vocabulary modules (an embedding's A is [r, vocab], like a linear's [r, in])."""
    return {name: (m.fan_in, m.fan_out) for name, m in arch.linear_modules.items()} | {
        "embed_tokens": (arch.vocab_size, arch.hidden_size), "lm_head": (arch.hidden_size, arch.vocab_size)}


@dataclass
class LoraWeights:
    rank: int  # the largest module rank (rank_pattern may give modules smaller ones)
    config: LoraConfig
    # (layer, module name) -> (A [rank, in_features], B [out_features, rank] with scaling folded in), fp32;
    # a stacked parameter (arch.lora_parameters) has one pair per expert: A [experts, rank, in], B [experts, out, rank]
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # DoRA: (layer, module name) -> magnitude [out_features], fp32; empty for a plain LoRA.
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # lora_bias: (layer, module name) -> lora_B's bias [out_features] with scaling folded in, fp32.
    lora_biases: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # DoRA: magnitude / ||W + BA|| per output row, which depends on the base weights: computed
    # once by the engine that serves the adapter (engine/models/slot_rows.py).
    dora_scales: dict[tuple[int, str], torch.Tensor] | None = field(default=None, repr=False)
    # The base embedding or head peft saved beside their LoRA ("embed_tokens"/"lm_head" -> [vocab,
    # hidden]), as in the file: the engine checks them against its own, then drops them.
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def has_row_terms(self) -> bool:
        """Whether the adapter rescales or shifts its output rows (DoRA, lora_bias)."""
        return bool(self.magnitudes or self.lora_biases)

    @property
    def num_bytes(self) -> int:
        tensors = [t for pair in self.modules.values() for t in pair]
        tensors += list(self.magnitudes.values()) + list(self.lora_biases.values()) + list(self.base_copies.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def load_adapter(adapter_dir: str | Path, arch: ModelArchConfig, max_lora_rank: int, *,
                 base_model_name: str | None = None, strict_base_model: bool = False,
                 max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> LoraWeights:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError("missing_file", f"adapter directory {str(adapter_dir)!r} does not exist")
    if not (adapter_dir / CONFIG_FILE).exists():
        raise AdapterError("missing_file", f"{CONFIG_FILE} is missing from the adapter directory{_subdir_hint(adapter_dir)}")
    config = LoraConfig.from_file(adapter_dir / CONFIG_FILE).on_model(arch)
    # Cheap config checks first, so a wrong adapter is refused before its weights are read.
    config.check_base_model(base_model_name, strict_base_model)
    config.check_rank(max_lora_rank)
    targets = config.targets(arch.num_layers)
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError("pickle_weights", f"found only pickle weights ({', '.join(pickles)}), which are never "
                               f"loaded because unpickling can run code; save with safe_serialization=True to get {WEIGHTS_FILE}")
        raise AdapterError("missing_file", f"{WEIGHTS_FILE} is missing from the adapter directory{_subdir_hint(adapter_dir)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError("too_large", f"{WEIGHTS_FILE} is {size} bytes; the limit is {max_bytes}")
    try:
        modules, magnitudes, biases, base_copies = _read_weights(path, config, targets, module_shapes(arch), arch)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types, OSError, or ValueError on bad files
        raise AdapterError("invalid_weights", f"{WEIGHTS_FILE} is not a valid safetensors file ({e})") from e
    return LoraWeights(rank=config.max_rank, config=config, modules=modules, magnitudes=magnitudes,
                       lora_biases=biases, base_copies=base_copies)


def _read_weights(path: Path, config: LoraConfig, targets: set[tuple[int, str]],
                  shapes: dict[str, tuple[int, int]], arch: ModelArchConfig) -> dict:
    from safetensors import safe_open

    found: dict[tuple[int, str, str], str] = {}  # (layer, module, "lora_A"/"lora_B") -> key
    base_copies: dict[str, str] = {}  # "embed_tokens"/"lm_head" -> key of peft's copy of the base weight
    # transformers 4's experts (moe_adapters.py): (layer, parameter) -> {(expert, part, kind): key}
    per_expert: dict[tuple[int, str], dict[tuple[int, int, str], str]] = {}
    module_path_re = _module_path_regex(arch.module_prefixes)
    skipped = tuple("base_model.model." + p for p in arch.skipped_prefixes) + arch.skipped_prefixes
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        for key in keys:  # validate every key's name before reading any tensor
            if key.startswith(skipped):  # a vision tower's LoRA: text requests never run it
                continue
            name_key = normalized_key(key) if arch.is_moe else key
            expert = parse_per_expert_key(name_key, arch.model_type, arch.num_experts) if arch.is_moe else None
            if expert is not None:
                layer, name, e, part, kind = expert
                if (layer, name) not in targets:
                    raise AdapterError("invalid_weights", f"key {key!r} is for {config.paths(layer, name)[0]}, but "
                                       "adapter_config.json does not target it")
                per_expert.setdefault((layer, name), {})[(e, part, kind)] = key
                continue
            copy = _BASE_COPY_KEY.fullmatch(key)
            vocab = copy and _vocab_module(copy["path"], config)
            if vocab:
                base_copies[vocab] = key
                continue
            target, kind = _parse_key(name_key, targets, arch.num_layers, config, module_path_re)
            if (*target, kind) in found:
                raise AdapterError("invalid_weights", f"{key!r} and {found[(*target, kind)]!r} both hold {kind} of "
                                   f"{config.paths(*target)[0]}; the file mixes several adapters")
            found[(*target, kind)] = key
        mixed = sorted(t for t in per_expert if (*t, "lora_A") in found or (*t, "lora_B") in found)
        if mixed:
            raise AdapterError("invalid_weights", f"{WEIGHTS_FILE} holds {config.paths(*mixed[0])[0]} both per expert "
                               "(transformers 4) and stacked; the file mixes several adapters")
        kinds = ("lora_A", "lora_B") + ("lora_magnitude_vector",) * config.use_dora + ("lora_B.bias",) * config.lora_bias
        for layer, name in sorted(set(targets) - per_expert.keys()):
            for kind in kinds:
                if (layer, name, kind) not in found:
                    raise AdapterError("invalid_weights", f"{WEIGHTS_FILE} has no {kind} for {config.paths(layer, name)[0]}, "
                                       "which adapter_config.json targets")
        modules, magnitudes, biases = {}, {}, {}
        copies = {name: _tensor(f, key, (arch.vocab_size, arch.hidden_size), None,
                                f"the base model's vocab_size={arch.vocab_size}, hidden_size={arch.hidden_size}")
                  for name, key in base_copies.items()}
        for layer, name in sorted(targets):
            r = config.rank_of(layer, name)
            if (layer, name) in per_expert:
                a, b = stacked_pair(per_expert[(layer, name)], name, r, arch.lora_parameters[name],
                                    lambda *args: _tensor(f, *args), config.paths(layer, name)[0])
            elif config.is_parameter(name):
                a, b = _parameter_pair(f, found[(layer, name, "lora_A")], found[(layer, name, "lora_B")], r,
                                       arch.lora_parameters[name])
            else:
                fan_in, fan_out = shapes[name]
                # A is [r, in] and B [out, r] whatever fan_in_fan_out says: in peft it only marks a
                # transposed *base* weight (GPT-2's Conv1D); lora_A/B are always nn.Linear, and peft
                # resets fan_in_fan_out to false on nn.Linear targets such as Llama's.
                a = _tensor(f, found[(layer, name, "lora_A")], (r, fan_in), 0, f"r={r}, in_features={fan_in}")
                b = _tensor(f, found[(layer, name, "lora_B")], (fan_out, r), 1, f"out_features={fan_out}, r={r}")
            modules[(layer, name)] = (a.contiguous(), (b * config.scaling_of(layer, name)).contiguous())
            if config.use_dora:
                key = found[(layer, name, "lora_magnitude_vector")]
                magnitudes[(layer, name)] = _tensor(f, key, (fan_out,), None, f"out_features={fan_out}")
            if config.lora_bias:
                key = found[(layer, name, "lora_B.bias")]
                biases[(layer, name)] = _tensor(f, key, (fan_out,), None, f"out_features={fan_out}") * \
                    config.scaling_of(layer, name)
    # One finiteness check over everything (per-tensor checks dominated the cold-load time): a
    # NaN or inf anywhere makes the sum non-finite. Only then, or when finite values merely
    # add up past fp32's range, is the culprit searched for, tensor by tensor.
    tensors = [t.view(-1) for pair in modules.values() for t in pair] + list(magnitudes.values()) + list(biases.values())
    if tensors and not torch.isfinite(torch.cat(tensors).sum()):
        _raise_non_finite(path, found, modules, config)
    return modules, magnitudes, biases, copies


def _parameter_pair(f, key_a: str, key_b: str, r: int, p) -> tuple[torch.Tensor, torch.Tensor]:
    """A target_parameters LoRA as A [experts, r, in], B [experts, out, r]. peft's ParamWrapper
    saves lora_A as [experts * r, in] (expert e's A in rows e * r ...) and lora_B as
    [out, r * experts] (expert e's B in columns e, e + experts, ...); e's delta is B_e @ A_e."""
    e = p.experts
    a = _tensor(f, key_a, (e * r, p.fan_in), 0, f"{e} x r={r}, in_features={p.fan_in}")
    b = _tensor(f, key_b, (p.fan_out, r * e), 1, f"out_features={p.fan_out}, r={r} x {e}")
    return a.view(e, r, p.fan_in), b.view(p.fan_out, r, e).permute(2, 0, 1)


def _raise_non_finite(path: Path, found: dict, modules: dict, config: LoraConfig) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for (layer, name), (_, scaled_b) in sorted(modules.items()):
            if (layer, name, "lora_A") not in found:  # a transformers 4 expert's: checked below
                continue
            for kind in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_B.bias"):
                key = found.get((layer, name, kind))
                if key is None:  # not a DoRA or lora_bias adapter
                    continue
                if not torch.isfinite(f.get_tensor(key).to(torch.float32)).all():
                    raise AdapterError("non_finite_weights", f"{key!r} contains NaN or inf (or values beyond fp32's range)")
            if not torch.isfinite(scaled_b).all():
                raise AdapterError("non_finite_weights", f"{found[(layer, name, 'lora_B')]!r} overflows fp32 after "
                                   f"scaling by {config.scaling_of(layer, name):g}")
    for (layer, name), pair in sorted(modules.items()):
        if not all(torch.isfinite(t).all() for t in pair):
            raise AdapterError("non_finite_weights", f"the LoRA of {config.paths(layer, name)[0]}'s experts contains "
                               "NaN or inf (or values beyond fp32's range)")


def _parse_key(key: str, targets: set[tuple[int, str]], num_layers: int, config: LoraConfig,
               module_path_re: re.Pattern) -> tuple[tuple[int, str], str]:
    embedding = _EMBEDDING_KEY.fullmatch(key)
    if embedding is not None and _vocab_module(embedding["path"], config) == "embed_tokens":
        return _vocab_target(key, "embed_tokens", targets, config), f"lora_{embedding['kind']}"
    m = _LORA_KEY.fullmatch(key) or _MAGNITUDE_KEY.fullmatch(key)
    if m is not None and m["kind"] in ("lora_A", "lora_B") and _vocab_module(m["path"], config) == "lm_head":
        return _vocab_target(key, "lm_head", targets, config), m["kind"]
    bias = _BIAS_KEY.fullmatch(key) if m is None else None
    if m is not None and m["kind"] == "lora_magnitude_vector" and not config.use_dora:
        raise AdapterError("invalid_weights", f"key {key!r} is a DoRA magnitude vector, but adapter_config.json "
                           "does not set use_dora=true")
    if bias is not None:
        if not config.lora_bias:
            raise AdapterError("invalid_weights", f"key {key!r} is a bias of lora_B, but adapter_config.json does "
                               "not set lora_bias=true")
        m = bias
    if m is None:
        what = next((w for marker, w in _KEY_HINTS if marker in key), "not a LoRA A/B weight")
        raise AdapterError("invalid_weights", f"unexpected key {key!r} in {WEIGHTS_FILE} ({what}); "
                           "only lora_A/lora_B weights of linear modules can be served")
    # peft wraps each targeted parameter of a module (a MoE block's experts) in its own
    # ParamWrapper, nested: "experts.base_layer.lora_A" is the inner one's.
    depth = m["path"].count(".base_layer")
    p = module_path_re.fullmatch(m["path"].replace(".base_layer", ""))
    name = None if p is None else _target_name(int(p["layer"]), p["parent"], p["module"], depth, config, targets)
    if name is None:
        raise AdapterError("unknown_target_module", f"key {key!r} adapts {m['path']!r}, which is not a LoRA target of "
                           f"the base model; targets are {config.target_names(num_layers)}")
    layer = int(p["layer"])
    if (layer, name) not in targets:
        why = (f"the base model has only {num_layers} layers" if layer >= num_layers
               else f"adapter_config.json does not target it (target_modules={config.target_modules!r}, "
                    f"layers_to_transform={config.layers_to_transform})")
        raise AdapterError("invalid_weights", f"key {key!r} is for {config.paths(layer, name)[0]}, but {why}")
    return (layer, name), m["kind"] if bias is None else "lora_B.bias"


def _vocab_module(path: str, config: LoraConfig) -> str | None:
    """"embed_tokens" or "lm_head" where a key's module path names one, else None."""
    path = path.removeprefix("base_model.model.")
    return next((name for name in VOCAB_MODULES if path in config.paths(VOCAB_LAYER, name)), None)


def _vocab_target(key: str, name: str, targets: set[tuple[int, str]], config: LoraConfig) -> tuple[int, str]:
    if (VOCAB_LAYER, name) not in targets:
        raise AdapterError("invalid_weights", f"key {key!r} is for {name}, but adapter_config.json does not target it "
                           f"(target_modules={config.target_modules!r})")
    return VOCAB_LAYER, name


def _target_name(layer: int, parent: str, module: str, depth: int, config: LoraConfig,
                 targets: set[tuple[int, str]]) -> str | None:
    """The linear module or parameter a key's module path names. A module's parameter
    wrappers nest in the order its parameters are defined, the first innermost."""
    if depth == 0 and config.parent_of(module) == parent:
        return module
    held = [n for n, par in config.parameters if par == parent and n.startswith(module + ".")]
    wrapped = [n for n in held if (layer, n) in targets] or held
    return wrapped[len(wrapped) - 1 - depth] if depth < len(wrapped) else None


def _tensor(f, key: str, expected: tuple[int, ...], rank_axis: int | None, meaning: str) -> torch.Tensor:
    sl = f.get_slice(key)
    dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
    if dtype not in _FLOAT_DTYPES:
        raise AdapterError("invalid_weights", f"{key!r} has dtype {dtype}; expected one of {', '.join(_FLOAT_DTYPES)}")
    if shape != expected:
        rank_only = rank_axis is not None and len(shape) == 2 and shape[1 - rank_axis] == expected[1 - rank_axis]
        hint = ("its rank differs from r (or rank_pattern) in adapter_config.json" if rank_only
                else "was it trained for another base model?")
        raise AdapterError("shape_mismatch", f"{key!r} has shape {list(shape)}; expected {list(expected)} "
                           f"({meaning}): {hint}")
    return f.get_tensor(key).to(torch.float32)


def _subdir_hint(adapter_dir: Path) -> str:
    # peft saves a non-"default" adapter into a subfolder named after it.
    subs = sorted(p.name for p in adapter_dir.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists())
    return f" (found one in subdirectory {subs[0]!r}: peft saves named adapters there)" if subs else ""
