"""Adapters of a sparse-expert model's experts and router (Mixtral, Qwen3-MoE).

transformers 5 stacks each layer's experts into two parameters (gate and up rows fused, then
down), which peft adapts through target_parameters; `parameter_targets` resolves those as peft
does. transformers 4 kept each expert as linear modules ("model.layers.3.mlp.experts.7.gate_proj",
Mixtral's "block_sparse_moe.experts.7.w1") and the router as a linear ("mlp.gate"), adapted
through target_modules; peft converts such adapters when it loads them, and so does this:
- the config: expert names in target_modules become target_parameters, and where gate and up
  are fused, that parameter gets twice the rank and twice the alpha (alpha / r unchanged;
  with rsLoRA the scaling changes, as in peft);
- the weights: per expert, gate's and up's A stacked along the rank ([A_gate; A_up]) and their
  B placed block-diagonally, so B @ A gives each its own rows, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch

from .errors import AdapterError

GATE_UP, DOWN, ROUTER = "experts.gate_up_proj", "experts.down_proj", "gate.weight"
# transformers 4 linear name -> (the transformers 5 parameter holding it, its part of a fused one), per
# model_type: peft's _MOE_TARGET_MODULE_MAPPING.
PER_EXPERT_LINEARS: dict[str, dict[str, tuple[str, int]]] = {
    "mixtral": {"gate": (ROUTER, 0), "w1": (GATE_UP, 0), "w3": (GATE_UP, 1), "w2": (DOWN, 0)},
    "qwen3_moe": {"gate": (ROUTER, 0), "gate_proj": (GATE_UP, 0), "up_proj": (GATE_UP, 1), "down_proj": (DOWN, 0)},
}
PER_EXPERT_KEY = re.compile(r".*layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<linear>\w+)"
                            r"\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.weight")


def normalized_key(key: str) -> str:
    """Mixtral's transformers 4 block name, renamed as transformers renames it."""
    return key.replace(".block_sparse_moe.", ".mlp.")


def on_stacked_experts(config, arch):
    """`config` (a LoraConfig) with transformers 4's expert and router names moved to
    target_parameters; unchanged where it names none (or on a model without experts)."""
    mapping = PER_EXPERT_LINEARS.get(arch.model_type)
    targets = config.target_modules
    if mapping is None or not targets:
        return config
    if isinstance(targets, str):
        targets = (tuple(name for name, _ in config.linears) + tuple(mapping) if targets.lower() == "all-linear"
                   else _regex_names(re.compile(targets), config, arch.num_layers, mapping))
    old = {t: next((n for n in mapping if t == n or t.endswith("." + n)), None) for t in targets}
    moved = {n for n in old.values() if n is not None}
    if not moved:
        return config
    fused = {n for n, (param, _) in mapping.items() if param == GATE_UP}
    if moved & fused and not fused <= moved:
        raise AdapterError("unsupported_adapter", f"adapter_config.json targets {sorted(moved & fused)} of the experts "
                           f"but not {sorted(fused - moved)}: transformers 5 fuses them into one gate_up_proj, so "
                           "neither can be adapted alone")
    rank, alpha = config.rank_pattern, config.alpha_pattern
    if moved & fused:
        pattern = r".*\." + re.escape(GATE_UP.split(".")[-1])
        rank, alpha = rank + ((pattern, 2 * config.r),), alpha + ((pattern, 2 * config.lora_alpha),)
    return replace(config, target_modules=tuple(sorted(t for t, n in old.items() if n is None)),
                   target_parameters=tuple(sorted(set(config.target_parameters) | {mapping[n][0] for n in moved})),
                   rank_pattern=rank, alpha_pattern=alpha, per_expert=True)


def parameter_targets(config, num_layers: int) -> set[tuple[int, str]]:
    """(layer, parameter) pairs `config` (a LoraConfig) adapts through target_parameters, by
    peft's rule: a parameter's full name equals an entry or ends with "." + entry;
    layers_to_transform and exclude_modules do not apply (except to converted per-expert
    linears, which were trained with it)."""
    if not config.target_parameters:
        return set()
    paths = {p: (i, n) for i in range(num_layers) for n, _ in config.parameters for p in config.paths(i, n)}
    matches = lambda p, e: p == e or p.endswith("." + e)  # noqa: E731
    unknown = [e for e in config.target_parameters if not any(matches(p, e) for p in paths)]
    if unknown:
        can = (f"LoRA can target the parameters {', '.join(n for n, _ in config.parameters)} in layers "
               f"0..{num_layers - 1}" if config.parameters else
               "only a sparse-expert model's experts and router are served as parameters; target this model's "
               f"linear modules ({config.linear_names}) with target_modules")
        raise AdapterError("unknown_target_module", f"target_parameters {unknown} match no parameter of the base "
                                                    f"model; {can}")
    return {t for p, t in paths.items() if any(matches(p, e) for e in config.target_parameters)
            and (not config.per_expert or config.layer_selected(p))}


def _regex_names(regex: re.Pattern, config, num_layers: int, mapping: dict) -> tuple[str, ...]:
    """The names a target_modules regex stands for on a transformers 5 MoE model, resolved as
    peft resolves it before converting: each linear whose full name it matches, the router
    module ("model.layers.0.mlp.gate") and each transformers 4 expert linear whose name it
    matches under the experts ("model.layers.0.mlp.experts.gate_proj": no expert index)."""
    found = set()
    for i in range(num_layers):
        found |= {name for name, _ in config.linears if any(regex.fullmatch(p) for p in config.paths(i, name))}
        for prefix in config.module_prefixes:
            block = f"{prefix}layers.{i}.mlp"
            found |= {n for n in mapping if regex.fullmatch(f"{block}.{'gate' if n == 'gate' else 'experts.' + n}")}
    return tuple(sorted(found))


def parse_per_expert_key(key: str, model_type: str, num_experts: int) -> tuple[int, str, int, int, str] | None:
    """(layer, parameter, expert, part, "lora_A"/"lora_B") of a transformers 4 expert's key;
    None for other keys."""
    m = PER_EXPERT_KEY.fullmatch(key)
    if m is None:
        return None
    linears = PER_EXPERT_LINEARS.get(model_type, {})
    if m["linear"] not in linears or m["linear"] == "gate" or int(m["expert"]) >= num_experts:
        raise AdapterError("unknown_target_module", f"key {key!r} adapts an expert linear the base model does not have; "
                           f"its {num_experts} experts have {', '.join(n for n in linears if n != 'gate')}")
    param, part = linears[m["linear"]]
    return int(m["layer"]), param, int(m["expert"]), part, m["kind"]


def stacked_pair(keys: dict[tuple[int, int, str], str], name: str, rank: int, p, read: Callable,
                 where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's parameter `name` (p: its arch.LoraParameter) from its experts' keys
    {(expert, part, kind): key}, as loader.LoraWeights holds it: A [experts, rank, in],
    B [experts, out, rank]. read(key, shape, rank_axis, meaning) reads and checks a tensor."""
    parts = 2 if name == GATE_UP else 1
    r, out = rank // parts, p.fan_out // parts
    a = torch.zeros(p.experts, rank, p.fan_in)
    b = torch.zeros(p.experts, p.fan_out, rank)
    for e in range(p.experts):
        for part in range(parts):
            for kind in ("lora_A", "lora_B"):
                if (e, part, kind) not in keys:
                    raise AdapterError("invalid_weights", f"the adapter has no {kind} for expert {e} of {where}, whose "
                                       "other experts it adapts")
            ranks = slice(part * r, (part + 1) * r)
            a[e, ranks] = read(keys[(e, part, "lora_A")], (r, p.fan_in), 0, f"r={r}, in_features={p.fan_in}")
            b[e, part * out:(part + 1) * out, ranks] = read(keys[(e, part, "lora_B")], (out, r), 1,
                                                            f"out_features={out}, r={r}")
    return a, b
