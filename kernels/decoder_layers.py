"""A step's decoder layers in one native call (csrc/decoder_layers.c) where the step allows it:
the kernels DecoderLayer.forward calls one by one, in the same order with the same
arguments, so the hidden states are the same bits; what goes is the Python between them.

A step qualifies on CPU with the native kernels, bf16, every layer a plain DecoderLayer
(engine/models/llama.py: no experts, no residual scale) with tile-packed projections
(kernels/dense.py, TiledWeight), short queries only (decode, speculative verification; a
prefill chunk takes the Python path), and LoRA through the native segment kernel without row
terms (DoRA, lora_bias take the Python path). `enabled = False` turns it off (the tests
compare both paths).
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .dense import TiledWeight

enabled = True

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Projection(ctypes.Structure):
    _fields_ = [("tiles", _p), ("bias", _p), ("out_features", _i64), ("in_features", _i64), ("lora_table", _p),
                ("lora_modules", _i64), ("lora_amx", _i64)]


class _AttentionGroup(ctypes.Structure):
    _fields_ = [("requests", _i64), ("max_blocks", _i64), ("block_size", _i64), ("slot_mapping", _p),
                ("query_start", _p), ("query_len", _p), ("context_len", _p), ("block_table", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p), ("rope_cos", _p),
                ("rope_sin", _p), ("k_cache", _p), ("v_cache", _p), ("rope_dim", _i64), ("window", _i64),
                ("group", _i64), ("cache_block_size", _i64), ("norm_eps", _f32), ("qk_norm_eps", _f32), ("scale", _f32), ("softcap", _f32),
                ("qkv", _Projection), ("o", _Projection), ("gate_up", _Projection), ("down", _Projection)]


class _Step(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("tokens", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "threads",
                                    "amx_gemm")] + \
               [(n, _p) for n in ("x", "normed", "qkv", "attn", "o", "gate_up", "act", "mlp", "pending", "positions",
                                  "groups")] + \
               [("lora_rank", _i64), ("lora_segments", _i64), ("short_segments", _i64)] + \
               [(n, _p) for n in ("lora_start", "lora_len", "lora_slot", "short_start", "short_len", "short_slot")]


_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class _Specs:
    """The layers' structs for one LoRA target set, and what they point into (kept alive)."""

    def __init__(self, model, kv_caches, lora):
        self.keep: list = []
        self.needs_short_segments = False  # some LoRA runs on the kernel that takes short segments only
        self.array = (_Layer * len(model.layers))()
        full, nope = (model.rope_cos, model.rope_sin), (model.nope, model.nope)
        local = (model.rope_local_cos, model.rope_local_sin) if model.local_rope else full
        for i, (layer, (k_cache, v_cache, group)) in enumerate(zip(model.layers, kv_caches)):
            cos, sin = nope if i in model.config.nope_layers else full if layer.window is None else local
            spec = self.array[i]
            spec.input_norm, spec.post_norm = layer.input_layernorm.weight.data_ptr(), \
                layer.post_attention_layernorm.weight.data_ptr()
            if model.config.qk_norm:
                spec.q_norm, spec.k_norm = layer.q_norm.weight.data_ptr(), layer.k_norm.weight.data_ptr()
                spec.qk_norm_eps = layer.q_norm.eps
            spec.rope_cos, spec.rope_sin, spec.rope_dim = cos.data_ptr(), sin.data_ptr(), cos.shape[1]
            spec.k_cache, spec.v_cache, spec.group = k_cache.data_ptr(), v_cache.data_ptr(), group
            spec.cache_block_size = k_cache.shape[2]
            spec.window, spec.norm_eps, spec.scale = layer.window or 0, layer.input_layernorm.eps, layer.scale
            for name, field in zip(_PROJECTIONS, ("qkv", "o", "gate_up", "down")):
                self._fill(getattr(spec, field), getattr(layer, name), lora)

    def _fill(self, spec: _Projection, proj, lora) -> None:
        w = proj.packed
        spec.tiles, spec.out_features, spec.in_features = w.tiles.data_ptr(), w.out_features, w.in_features
        if proj.bias is not None:
            bias = proj.bias.to(torch.bfloat16).contiguous()
            self.keep.append(bias)
            spec.bias = bias.data_ptr()
        mods = proj.lora_modules(lora.pool, lora.modules) if lora is not None else None
        if mods is not None and mods.modules:
            self.keep.append(mods)
            spec.lora_table, spec.lora_modules, spec.lora_amx = mods.table.data_ptr(), len(mods.modules), mods.amx
            self.needs_short_segments |= not mods.amx


class FusedLayers:
    """Built once per model: whether its layers can run in one call, and their structs."""

    def __init__(self, model):
        from loragate.engine.models.llama import DecoderLayer

        c = model.config
        self.model, self.kernel, self.ok = model, None, False
        self._specs: dict = {}
        if not (all(type(layer) is DecoderLayer and layer.moe is None for layer in model.layers)
                and model.dtype == torch.bfloat16 and model.device.type == "cpu" and native.library() is not None):
            return
        projections = [getattr(layer, n) for layer in model.layers for n in _PROJECTIONS]
        kernels = {p.packed.kernel if isinstance(p.packed, TiledWeight) else None for p in projections}
        norms = [layer.input_layernorm.weight for layer in model.layers] + \
                [layer.post_attention_layernorm.weight for layer in model.layers]
        if c.qk_norm:
            norms += [n.weight for layer in model.layers for n in (layer.q_norm, layer.k_norm)]
        self.kernel = kernels.pop() if len(kernels) == 1 else None
        self.ok = (self.kernel is not None and c.residual_scale is None and c.head_dim <= native.MAX_HEAD_DIM
                   and all(n.dtype == torch.bfloat16 for n in norms)
                   and max(c.hidden_size, c.intermediate_size) <= native.MAX_ROW_WIDTH)

    def run(self, x: torch.Tensor, kv_caches, batch) -> torch.Tensor | None:
        """The layers over x (updated in place); returns the last layer's pending output, or
        None (nothing done) where the step does not qualify."""
        if not (enabled and self.ok and batch.use_native_kernels and x.device.type == "cpu" and x.is_contiguous()):
            return None
        T = x.shape[0]
        if self.kernel == "amx" and T >= TiledWeight.MAX_ROWS:
            return None  # the Python path takes oneDNN's copy there
        groups = batch.group_attention or [batch.attention]
        if any(g.query_start is None or g.prefill_spans or not g.use_native or g.block_size > native.MAX_BLOCK_SIZE
               for g in groups):
            return None
        lora = batch.lora
        if lora is not None and (lora.row_slots is not None or lora.row_terms or lora.plan is None
                                 or lora.plan.lora_term_row is not None or lora.rank > native.MAX_LORA_RANK):
            return None
        specs = self._specs_for(kv_caches, lora)
        if specs is None or (specs.needs_short_segments and lora.plan.long_segments):
            return None
        return self._call(x, specs, groups, batch, lora)

    def _specs_for(self, kv_caches, lora) -> _Specs | None:
        key = (id(kv_caches), None if lora is None else (id(lora.pool), lora.modules))
        specs = self._specs.get(key)
        if specs is None:
            if lora is not None and any(
                    (m := getattr(layer, n).lora_modules(lora.pool, lora.modules)).modules
                    and not (m.native_ok and m.dtype == torch.bfloat16)
                    for layer in self.model.layers for n in _PROJECTIONS):
                return None
            specs = self._specs[key] = _Specs(self.model, kv_caches, lora)
            specs.keep.append(kv_caches)  # its id is the key: keep it from being reused
        return specs

    def _call(self, x: torch.Tensor, specs: _Specs, groups, batch, lora) -> torch.Tensor:
        c, T = self.model.config, x.shape[0]
        qkv_width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        widths = {"normed": c.hidden_size, "qkv": qkv_width, "attn": c.num_heads * c.head_dim, "o": c.hidden_size,
                  "gate_up": 2 * c.intermediate_size, "act": c.intermediate_size, "mlp": c.hidden_size}
        scratch = {n: torch.empty(T, w, dtype=x.dtype) for n, w in widths.items()}
        metas = (_AttentionGroup * len(groups))(*(
            _AttentionGroup(g.query_start.shape[0], g.block_table.shape[1], g.block_size, g.slot_mapping.data_ptr(),
                            g.query_start.data_ptr(), g.query_len.data_ptr(), g.context_len.data_ptr(),
                            g.block_table.data_ptr()) for g in groups))
        step = _Step(tokens=T, hidden=c.hidden_size, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                     intermediate=c.intermediate_size, threads=torch.get_num_threads(),
                     amx_gemm=int(self.kernel == "amx"), x=x.data_ptr(), positions=batch.positions.data_ptr(),
                     groups=ctypes.addressof(metas), **{n: t.data_ptr() for n, t in scratch.items()})
        if lora is not None:
            plan = lora.plan
            step.lora_rank, step.lora_segments, step.short_segments = lora.rank, plan.lora_slots.shape[0], \
                plan.short_slots.shape[0]
            step.lora_start, step.lora_len, step.lora_slot = (t.data_ptr() for t in (plan.lora_start, plan.lora_count,
                                                                                     plan.lora_slots))
            step.short_start, step.short_len, step.short_slot = (t.data_ptr() for t in (plan.short_start,
                                                                                        plan.short_count,
                                                                                        plan.short_slots))
        if native.library().decoder_layers(specs.array, len(specs.array), ctypes.byref(step)) != 0:
            raise RuntimeError("native decoder layers refused their arguments")
        return scratch["mlp"]
