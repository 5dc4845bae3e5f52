"""A PEFT `adapter_config.json`, parsed and checked against what loragate can serve.

Matching follows peft 0.21 (`check_target_module_exists`) so an adapter targets exactly the
modules peft would wrap on the HF model: a list entry matches a module whose full name
equals it or ends with "." + entry; a string is re.fullmatch'ed against full names such as
"model.layers.3.self_attn.q_proj"; layers_to_transform filters suffix matches only.
Anything that would change the forward pass and that we do not implement is refused, so an
adapter is never served silently wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import AdapterError
from .module_names import LLAMA_LINEARS, VOCAB_LAYER, VOCAB_MODULES
from .moe_adapters import on_stacked_experts, parameter_targets

MAX_CONFIG_BYTES = 1 << 20  # real configs are ~2 KB; a bigger one is not a config

# Training-time or bookkeeping keys: they do not change what the adapter computes.
_IGNORED_KEYS = frozenset({
    "task_type", "auto_mapping", "peft_version", "revision", "inference_mode", "lora_dropout",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "runtime_config",
})
# Keys that change the forward pass when set (truthy); we do not implement them (yet).
_UNSUPPORTED_IF_SET = {
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not supported; "
                       "only LoRA deltas can be served on the shared base model",
    "use_qalora": "QALoRA (use_qalora=true) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
_HANDLED_KEYS = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "base_model_name_or_path",
    "init_lora_weights", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "target_parameters",
    "ensure_weight_tying",
})
# These inits rewrite the base weights during training; unless the adapter was converted on
# save (path_initial_model_for_weight_conversion, which records init_lora_weights=true), it
# is only correct on that rewritten base. "mica" switches peft to a different forward.
_SAFE_INITS = ("gaussian", "eva", "orthogonal")  # and true/false


def _invalid(msg: str) -> AdapterError:
    return AdapterError("invalid_config", f"adapter_config.json: {msg}")


def _layer_regex(pattern: str | None) -> str:
    # peft's: the first numbered component after layers_pattern (or after any name).
    return r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _pattern(d: dict, key: str, valid, meaning: str) -> tuple:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise _invalid(f"{key} must be an object of module patterns, got {v!r}")
    for pattern, value in v.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as e:
            raise _invalid(f"{key} key {pattern!r} is not a valid regular expression: {e}") from None
        if not valid(value):
            raise _invalid(f"{key}[{pattern!r}] must be {meaning}, got {value!r}")
    return tuple(v.items())


def _match(pattern: tuple, paths: tuple[str, ...], default):
    return next((value for key, value in pattern if any(re.match(rf"(.*\.)?({key})$", p) for p in paths)), default)


def _names(d: dict, key: str, allow_str: bool) -> tuple[str, ...] | str | None:
    v = d.get(key)
    if v is None or (allow_str and isinstance(v, str)):
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise _invalid(f"{key} {v!r} is not a valid regular expression: {e}") from None
        return v
    if isinstance(v, list) and all(isinstance(x, str) and x for x in v):
        return tuple(sorted(set(v)))  # peft stores a set; order carries no meaning
    raise _invalid(f"{key} must be a list of module names{' or a regex string' if allow_str else ''}, got {v!r}")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # names, or a regex / "all-linear"
    use_rslora: bool = False
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False  # only describes the base layer's layout (GPT-2 Conv1D); see loader
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # DoRA: a magnitude vector per module rescales each output row (loader)
    lora_bias: bool = False  # lora_B has a bias (LoRAs extracted from full fine-tunes)
    # Per-module r and lora_alpha: (pattern, value) pairs in the file's order; the first pattern
    # that matches the end of a module's name wins (peft's get_pattern_key).
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # How the base model names its decoder layers' modules, which patterns are matched against
    # (set by on_model): "model.layers.3.self_attn.q_proj", or for a multimodal Gemma 3 its
    # language model's names; and the names of linear modules outside them (its vision tower),
    # which peft may have adapted too but text requests never run.
    module_prefixes: tuple[str, ...] = ("model.",)
    foreign_modules: frozenset[str] = frozenset()
    # The base model's targetable linears (name, parent), also set by on_model.
    linears: tuple[tuple[str, str], ...] = tuple(LLAMA_LINEARS.items())
    # Parameters adapted directly (peft's target_parameters): a sparse-expert block's experts and
    # router. The entries as in the file, and the base model's such parameters (name, parent).
    target_parameters: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = ()
    per_expert: bool = False  # converted from transformers 4's per-expert linears (moe_adapters.py)
    # peft's ensure_weight_tying: on a model whose head is its embedding, adapting either adapts
    # both, with one LoRA pair between them (peft saves it under both names). tied_vocab: that
    # applies on this base model (set by on_model).
    ensure_weight_tying: bool = False
    tied_vocab: bool = False

    def on_model(self, arch) -> "LoraConfig":
        """This config as it applies to the base model `arch` (a ModelArchConfig)."""
        return on_stacked_experts(replace(
            self, module_prefixes=arch.module_prefixes, foreign_modules=frozenset(arch.foreign_modules),
            tied_vocab=self.ensure_weight_tying and arch.tie_word_embeddings,
            linears=tuple((name, m.parent) for name, m in arch.linear_modules.items()),
            parameters=tuple((name, p.parent) for name, p in arch.lora_parameters.items())), arch)

    @property
    def linear_names(self) -> str:
        return ", ".join(name for name, _ in self.linears)

    def target_names(self, num_layers: int) -> str:
        return f"{self.linear_names} in layers 0..{num_layers - 1}, and embed_tokens and lm_head"

    def parent_of(self, name: str) -> str | None:
        return next((parent for n, parent in self.linears + self.parameters if n == name), None)

    def paths(self, layer: int, name: str) -> tuple[str, ...]:
        """The full names peft may have matched this module under."""
        if layer == VOCAB_LAYER:
            return ("lm_head",) if name == "lm_head" else tuple(f"{prefix}{name}" for prefix in self.module_prefixes)
        return tuple(f"{prefix}layers.{layer}.{self.parent_of(name)}.{name}" for prefix in self.module_prefixes)

    @classmethod
    def from_file(cls, path: str | Path) -> "LoraConfig":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise AdapterError("missing_file", f"{path.name} is missing from the adapter directory") from None
        except OSError as e:
            raise _invalid(f"cannot read {path.name}: {e.strerror}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError("too_large", f"{path.name} is over {MAX_CONFIG_BYTES} bytes")
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _invalid(f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        if not isinstance(d, dict):
            raise _invalid("must be a JSON object")
        peft_type = d.get("peft_type")
        if not isinstance(peft_type, str):
            raise _invalid("peft_type is missing; is this a PEFT adapter directory?")
        if peft_type != "LORA":
            raise AdapterError("unsupported_adapter",
                               f"peft_type {peft_type!r} is not supported; only LORA adapters can be served")
        for key, why in _UNSUPPORTED_IF_SET.items():
            if d.get(key):
                raise AdapterError("unsupported_adapter", f"adapter_config.json: {why} (got {key}={d[key]!r})")
        if d.get("bias", "none") != "none":
            raise AdapterError("unsupported_adapter", f"adapter_config.json: bias={d['bias']!r} trains the base model's "
                                                      "biases, which a shared base cannot apply; use bias=\"none\"")
        init = d.get("init_lora_weights", True)
        if not (init is True or init is False or (isinstance(init, str) and init in _SAFE_INITS)):
            raise AdapterError("unsupported_adapter", f"adapter_config.json: init_lora_weights={init!r} is not supported: "
                               "PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapters only work on the base model they rewrote; re-save "
                               "with peft's path_initial_model_for_weight_conversion to get a plain LoRA")
        for key, value in d.items():
            known = key in _IGNORED_KEYS or key in _UNSUPPORTED_IF_SET or key in _HANDLED_KEYS
            if not known and value not in (None, False, "", [], {}):
                # An option from a newer peft may change the forward pass; refuse rather than guess.
                raise AdapterError("unsupported_adapter", f"adapter_config.json: unknown option {key}={value!r}")

        r = d.get("r", 8)  # peft's defaults, so a config that omits them means what peft means
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise _invalid(f"r must be a positive integer, got {r!r}")
        alpha = d.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise _invalid(f"lora_alpha must be a finite number, got {alpha!r}")
        for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "ensure_weight_tying"):
            if not isinstance(d.get(key, False), bool):
                raise _invalid(f"{key} must be true or false, got {d[key]!r}")
        if d.get("use_dora") and d.get("lora_bias"):
            raise AdapterError("unsupported_adapter", "adapter_config.json: lora_bias=true with use_dora=true is not "
                                                      "a combination peft supports")
        targets = _names(d, "target_modules", allow_str=True)
        parameters = _names(d, "target_parameters", allow_str=False) or ()
        if not targets and not parameters:
            raise _invalid("target_modules is missing or empty; list the modules the adapter was trained on")
        if parameters and (d.get("use_dora") or d.get("lora_bias")):
            raise AdapterError("unsupported_adapter", "adapter_config.json: use_dora or lora_bias with target_parameters "
                                                      "is not supported")
        layers = d.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (isinstance(layers, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise _invalid(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if layers and isinstance(targets, str):
            raise _invalid("layers_to_transform cannot be combined with a target_modules string (peft refuses it too)")
        pattern = d.get("layers_pattern")
        if isinstance(pattern, str):
            pattern = [pattern]
        if pattern is not None and not (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)):
            raise _invalid(f"layers_pattern must be a string or a list of strings, got {pattern!r}")
        for p in pattern or ():
            try:  # peft splices it into a regex unescaped, so it must compile there
                re.compile(_layer_regex(p))
            except re.error as e:
                raise _invalid(f"layers_pattern {p!r} is not a valid regular expression: {e}") from None
        rank_pattern = _pattern(d, "rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v > 0,
                                "a positive integer")
        alpha_pattern = _pattern(d, "alpha_pattern", lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
                                 and math.isfinite(v), "a finite number")
        base = d.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise _invalid(f"base_model_name_or_path must be a string, got {base!r}")
        return cls(r=r, lora_alpha=float(alpha), target_modules=targets or (), target_parameters=parameters,
                   use_rslora=d.get("use_rslora", False),
                   exclude_modules=_names(d, "exclude_modules", allow_str=True),
                   layers_to_transform=tuple(sorted(set(layers))) if layers else None,  # peft: [] means all layers
                   layers_pattern=tuple(pattern) if pattern else None,
                   fan_in_fan_out=d.get("fan_in_fan_out", False), base_model_name_or_path=base,
                   use_dora=d.get("use_dora", False), lora_bias=d.get("lora_bias", False), rank_pattern=rank_pattern,
                   ensure_weight_tying=d.get("ensure_weight_tying", False),
                   alpha_pattern=tuple((k, float(v)) for k, v in alpha_pattern))

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have (peft sizes its checks the same way)."""
        return max([self.r, *(r for _, r in self.rank_pattern)])

    def rank_of(self, layer: int, name: str) -> int:
        return _match(self.rank_pattern, self.paths(layer, name), self.r)

    def scaling_of(self, layer: int, name: str) -> float:
        r = self.rank_of(layer, name)
        alpha = _match(self.alpha_pattern, self.paths(layer, name), self.lora_alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, num_layers: int) -> set[tuple[int, str]]:
        """(layer index, module name) pairs this adapter applies to on a base model with
        `num_layers` decoder layers."""
        if self.layers_to_transform and self.layers_to_transform[-1] >= num_layers:
            raise AdapterError("unknown_target_module", f"layers_to_transform names layer {self.layers_to_transform[-1]}, "
                               f"but the base model has {num_layers} layers (0..{num_layers - 1})")
        paths = {p: (i, m) for i in range(num_layers) for m, _ in self.linears for p in self.paths(i, m)}
        paths |= {p: (VOCAB_LAYER, m) for m in VOCAB_MODULES for p in self.paths(VOCAB_LAYER, m)}
        found: set[tuple[int, str]] = set()
        if not self.target_modules:  # only target_parameters
            pass
        elif isinstance(self.target_modules, str):
            everything = self.target_modules.lower() == "all-linear"  # peft: every linear but the LM head
            found = {t for p, t in paths.items() if (everything and t[0] != VOCAB_LAYER)
                     or re.fullmatch(self.target_modules, p)}
        else:
            unknown = [e for e in self.target_modules if not any(p == e or p.endswith("." + e) for p in paths)
                       and e.rsplit(".", 1)[-1] not in self.foreign_modules]
            if unknown:
                also = (f", and through target_parameters {', '.join(n for n, _ in self.parameters)}"
                        if self.parameters else "")
                raise AdapterError("unknown_target_module", f"target_modules {unknown} match no module of the base model; "
                                   f"LoRA can target {self.target_names(num_layers)}{also}")
            for p, t in paths.items():
                if p in self.target_modules:  # an exact full name ignores layers_to_transform, as in peft
                    found.add(t)
                elif any(p.endswith("." + e) for e in self.target_modules) and self.layer_selected(p):
                    found.add(t)
        found = {t for t in found if not any(self._excluded(p) for p in self.paths(*t))}
        found |= parameter_targets(self, num_layers)
        if self.tied_vocab and any(layer == VOCAB_LAYER for layer, _ in found):
            found |= {(VOCAB_LAYER, name) for name in VOCAB_MODULES}
        if (self.use_dora or self.lora_bias) and any(layer == VOCAB_LAYER for layer, _ in found):
            raise AdapterError("unsupported_adapter", "adapter_config.json: use_dora or lora_bias on embed_tokens or "
                                                      "lm_head is not supported")
        if not found:
            raise AdapterError("unknown_target_module", f"target_modules={self.target_modules!r} (with layers_to_transform="
                               f"{self.layers_to_transform}, layers_pattern={self.layers_pattern}) selects no module; "
                               f"LoRA can target {self.target_names(num_layers)}")
        return found

    def is_parameter(self, name: str) -> bool:
        return any(n == name for n, _ in self.parameters)

    def layer_selected(self, path: str) -> bool:
        if not self.layers_to_transform:
            return True
        patterns = self.layers_pattern or (None,)
        for pattern in patterns:
            m = re.match(_layer_regex(pattern), path)
            if m:
                return int(m["idx"]) in self.layers_to_transform
        return False

    def _excluded(self, path: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, path) is not None
        return any(path == e or path.endswith("." + e) for e in ex)

    def check_rank(self, max_lora_rank: int) -> None:
        if self.max_rank > max_lora_rank:
            what = f"r={self.r}" if self.max_rank == self.r else f"rank_pattern's {self.max_rank}"
            fused = any(k.endswith("gate_up_proj") and v == self.max_rank for k, v in self.rank_pattern)
            why = " (peft doubles r for a sparse-expert model's fused gate_up_proj)" if fused else ""
            raise AdapterError("rank_too_large", f"adapter rank {what}{why} exceeds this server's max_lora_rank="
                               f"{max_lora_rank}; start the server with a larger --max-lora-rank or retrain with a "
                               "smaller r")

    def check_base_model(self, expected_name: str | None, strict: bool) -> None:
        """Names are compared loosely (case, trailing slash): the same hub id is often
        written both ways. Only a strict server refuses; otherwise the name is advisory."""
        if not strict or not expected_name or not self.base_model_name_or_path:
            return
        if self.base_model_name_or_path.rstrip("/").lower() != expected_name.rstrip("/").lower():
            raise AdapterError("base_model_mismatch", f"adapter was trained on {self.base_model_name_or_path!r}, "
                               f"but this server serves {expected_name!r}")
