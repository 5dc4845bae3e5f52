"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norms,
Phi-3 with fused q/k/v and gate/up modules and partial RoPE, Granite with its four scaling
constants, SmolLM3 with RoPE-less layers, Mixtral and Qwen3-MoE with sparse experts (moe.py),
sliding windows where the config has them; Gemma 2 and 3's variant in gemma.py, OLMo 2 and
3's in olmo2.py) over a packed variable-length token batch: all tokens of all
requests in one [num_tokens, hidden] tensor, each with its own position, attending through
the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from loragate.kernels import layer_ops
from loragate.kernels.attention import paged_attention
from loragate.kernels.decoder_layers import FusedLayers
from loragate.kernels.dense import dense_linear, pack_weight

from .arch import LONGROPE, ModelArchConfig, projection_biases, rope_layer_types
from .linear import Projection
from .moe import SparseMoE
from .vocab_lora import add_embedding_lora, add_head_lora


def rope_tables(hf_config, max_positions: int, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, rotary dims] in fp32, computed like transformers does
    (its ROPE_INIT_FUNCTIONS give the inverse frequencies and the attention scaling); the
    rotary dims are head_dim, or its first partial_rotary_factor part.
    layer_type: for models whose rope_parameters are per layer type (Gemma 3).
    LongRoPE's factors are chosen once for every position, as vLLM does: the long ones when
    the tables run past original_max_position_embeddings (arch.py's LONGROPE)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf_config.rope_theta}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))  # Phi-4-mini rotates 3/4 of each head
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    else:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if rope_type == LONGROPE:  # its init takes the long factors when seq_len > original_max_position_embeddings
            kwargs["seq_len"] = max_positions
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual_delta: torch.Tensor | None, native: bool) -> torch.Tensor:
        return layer_ops.rms_norm(x, self.weight, self.eps, residual_delta, native)


class DecoderLayer(nn.Module):
    # Checkpoint module name -> attribute: the loader fills these norms' weights.
    NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}
    QK_NORMS = {"self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}

    def __init__(self, c: ModelArchConfig, dtype: torch.dtype, index: int):
        super().__init__()
        self.c = c
        h = c.hidden_size
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps, dtype)
        for name, bias in projection_biases(c).items():
            setattr(self, name, Projection.of(c, name, bias, dtype, index))
        self.moe = SparseMoE(c, dtype, index) if c.is_moe else None
        self.scale = c.head_dim ** -0.5 if c.attention_scale is None else c.attention_scale
        self.window = c.window(index)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.NORMS = self.NORMS | self.QK_NORMS

    def forward(self, x, pending, rope, k_cache, v_cache, batch, attention) -> torch.Tensor:
        """x: the residual stream [T, hidden], updated in place; pending: the previous layer's
        output not yet added to it (the add is fused into this layer's first norm).
        Returns this layer's MLP output, pending for the next layer."""
        # .forward, not __call__: nn.Module's call machinery (hooks we never use) costs more
        # than some of these kernels at decode sizes, and it runs ~200 times a step.
        c, native = self.c, batch.use_native_kernels
        T = x.shape[0]
        qkv = self.qkv_proj.forward(self.input_layernorm.forward(x, pending, native), batch)
        if c.qk_norm:
            layer_ops.rms_norm_heads(qkv, self.q_norm.weight, self.k_norm.weight, c.num_heads, c.num_kv_heads,
                                     c.head_dim, self.q_norm.eps, native)
        q, k, v = layer_ops.rope_write_kv(qkv, batch.positions, rope[0], rope[1], c.num_heads, c.num_kv_heads,
                                          c.head_dim, attention.slot_mapping, k_cache, v_cache, native)
        attn = paged_attention(q, k, v, k_cache, v_cache, attention, self.scale, self.window)
        attn = self.o_proj.forward(attn.view(T, -1), batch)
        h = self.post_attention_layernorm.forward(x, attn if c.residual_scale is None else attn.mul_(c.residual_scale),
                                                  native)
        if self.moe is not None:
            return self.moe.forward(h, batch, native)
        mlp = self.down_proj.forward(layer_ops.silu_mul(self.gate_up_proj.forward(h, batch), native), batch)
        return mlp if c.residual_scale is None else mlp.mul_(c.residual_scale)


class LlamaForCausalLM(nn.Module):
    layer_class = DecoderLayer
    norm_class = RMSNorm

    def __init__(self, c: ModelArchConfig, hf_config, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.config = c
        self.dtype = dtype
        self.fused_layers: FusedLayers | None = None
        # Given its (uninitialised) weight, Embedding skips its random init: 0.9 s for Gemma's 262k rows.
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size,
                                         _weight=torch.empty(c.vocab_size, c.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(self.layer_class(c, dtype, i) for i in range(c.num_layers))
        self.norm = self.norm_class(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size, dtype=dtype), requires_grad=False)
        # Cast like transformers (which computes in fp32, then casts to the activation dtype).
        # Where the layer types have RoPE parameters of their own, these are the global layers'.
        per_type = rope_layer_types(hf_config)
        cos, sin = rope_tables(hf_config, max_positions, "full_attention" if per_type else None)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)
        self.local_rope = "sliding_attention" in per_type  # the windowed layers' differ (another base)
        if self.local_rope:
            cos, sin = rope_tables(hf_config, max_positions, "sliding_attention")
            self.register_buffer("rope_local_cos", cos.to(dtype), persistent=False)
            self.register_buffer("rope_local_sin", sin.to(dtype), persistent=False)
        # RoPE tables zero dims wide rotate nothing: a RoPE-less layer's q and k pass through.
        self.register_buffer("nope", torch.empty(max_positions, 0, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def move_to(self, device: torch.device) -> None:
        """Loaded weights to `device` (before pack_weights)."""
        self.to(device)
        for module in self.modules():
            if isinstance(module, Projection):
                module.move_to(device)

    def pack_weights(self, int4: bool = False) -> None:
        """Called once after loading: every projection (and the head) to its fast layout;
        int4 quantizes the projections (weight-only), for a model whose outputs are only
        proposals (its head: see engine/spec/draft_head.py)."""
        for module in self.modules():
            if isinstance(module, (Projection, SparseMoE)):
                module.pack(int4)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        self.lm_head_packed = pack_weight(head)
        self.fused_layers = None  # built on the first step, from the packed weights

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, batch) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; kv_caches: per layer (k_cache, v_cache, its group
        of layers in the cache, engine/kv_layout.py).
        Returns final hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        add_embedding_lora(x, input_ids, batch)
        if self.config.embedding_scale is not None:  # Granite (a Python float, as transformers multiplies)
            x.mul_(self.config.embedding_scale)
        return self.run_layers(x, kv_caches, batch)

    def run_layers(self, x: torch.Tensor, kv_caches, batch) -> torch.Tensor:
        """The decoder layers over the embedded tokens x (updated in place), then the final norm."""
        if self.fused_layers is None:
            self.fused_layers = FusedLayers(self)
        pending = self.fused_layers.run(x, kv_caches, batch)  # one native call where the step allows it
        if pending is not None:
            return self.norm(x, pending, batch.use_native_kernels)
        full, nope = (self.rope_cos, self.rope_sin), (self.nope, self.nope)
        local = (self.rope_local_cos, self.rope_local_sin) if self.local_rope else full
        pending = None
        for i, (layer, (k_cache, v_cache, group)) in enumerate(zip(self.layers, kv_caches)):
            rope = nope if i in self.config.nope_layers else full if layer.window is None else local
            pending = layer.forward(x, pending, rope, k_cache, v_cache, batch, batch.attention_of(group))
        return self.norm(x, pending, batch.use_native_kernels)

    def compute_logits(self, hidden: torch.Tensor, fp32: bool = True, lora=None,
                       row_slots: list[int] | None = None) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab], fp32 or (fp32=False) in the model's dtype
        for the sampler, which converts only the rows it needs in fp32. lora: the step's
        LoraBatch, with each row's slot (-1: none), for adapters of the head."""
        logits = dense_linear(hidden, self.lm_head_packed, None)
        if row_slots is not None:
            add_head_lora(logits, hidden, row_slots, lora)
        logits = self.final_logits(logits)
        return logits.float() if fp32 else logits

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output as the model's logits, in its dtype as transformers computes them:
        Gemma 2 caps them (cap * tanh(logits / cap)), Granite divides them; others pass through."""
        c = self.config
        if c.logit_softcap is not None:
            return torch.tanh(logits / c.logit_softcap) * c.logit_softcap
        return logits if c.logits_divisor is None else logits / c.logits_divisor
