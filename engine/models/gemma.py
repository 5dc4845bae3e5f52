"""Gemma 2 and Gemma 3's text decoders (Gemma2ForCausalLM, Gemma3ForCausalLM, e.g. gemma-2-2b,
gemma-3-270m) on the Llama-family machinery of llama.py: the same fused, LoRA-targetable
projections, paged KV cache and packed token batch. What differs, each computed where
transformers computes it so bf16 rounds at the same points:
- RMSNorm scales by (1 + weight), in fp32 before rounding; a layer has four of them (norms
  before and after attention and MLP), and in Gemma 3 q and k are normed per head before RoPE;
- the embeddings are multiplied by sqrt(hidden_size); softmax scale query_pre_attn_scalar^-0.5;
- GELU (tanh approximation) gates the MLP;
- local layers attend over a sliding window (in Gemma 3 with their own RoPE base); global
  ones see everything;
- Gemma 2 caps attention scores and final logits: cap * tanh(x / cap).
The image + text checkpoints (Gemma3ForConditionalGeneration) load as their language model:
see arch.py's MULTIMODAL_MODULE_PREFIXES and loader.py."""

from __future__ import annotations

import torch
from torch import nn

from loragate.kernels import layer_ops
from loragate.kernels.attention import paged_attention

from ..errors import ModelConfigError
from .linear import Projection
from .arch import LAYER_TYPES, SUPPORTED_ROPE_TYPES, check_rope, common_fields, layer_windows, projection_biases
from .llama import LlamaForCausalLM
from .vocab_lora import add_embedding_lora

def gemma_arch(cls, hf):
    """ModelArchConfig for a Gemma2Config or Gemma3TextConfig; refuses what this decoder does not compute."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise ModelConfigError("use_bidirectional_attention is not supported (a causal LM is)")
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise ModelConfigError(f"hidden_activation {hf.hidden_activation!r} is not supported (only gelu_pytorch_tanh)")
    if unknown := set(hf.layer_types) - set(LAYER_TYPES):
        raise ModelConfigError(f"layer types {sorted(unknown)} are not supported")
    check_rope(hf, SUPPORTED_ROPE_TYPES)
    bias = bool(getattr(hf, "attention_bias", False))
    return cls(
        **common_fields(hf),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        attention_scale=hf.query_pre_attn_scalar ** -0.5,
        embedding_scale=hf.hidden_size ** 0.5,
        qk_norm=hf.model_type == "gemma3_text",
        layer_windows=layer_windows(hf),
        attention_softcap=getattr(hf, "attn_logit_softcapping", None),
        logit_softcap=getattr(hf, "final_logit_softcapping", None),
    )


class GemmaRMSNorm(nn.Module):
    """(x / rms(x)) * (1 + weight), all in fp32, rounded once at the end."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self._multiplier: torch.Tensor | None = None  # 1 + weight in fp32, made once the weights are loaded

    @property
    def multiplier(self) -> torch.Tensor:
        if self._multiplier is None or self._multiplier.device != self.weight.device:
            self._multiplier = 1.0 + self.weight.float()
        return self._multiplier

    def forward(self, x: torch.Tensor, residual_delta: torch.Tensor | None = None, native: bool = True) -> torch.Tensor:
        """Like llama.RMSNorm: residual_delta, if given, is first added to x in place."""
        return layer_ops.rms_norm(x, self.multiplier, self.eps, residual_delta, native)


class GemmaDecoderLayer(nn.Module):
    # Checkpoint module name -> attribute: the loader fills these norms' weights.
    NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
             "pre_feedforward_layernorm": "pre_feedforward_layernorm",
             "post_feedforward_layernorm": "post_feedforward_layernorm"}
    QK_NORMS = {"self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}

    def __init__(self, c, dtype: torch.dtype, index: int):
        super().__init__()
        self.c = c
        h = c.hidden_size
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(h, c.rms_norm_eps, dtype))
        if c.qk_norm:
            self.q_norm = GemmaRMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.NORMS = self.NORMS | self.QK_NORMS
        for name, bias in projection_biases(c).items():
            setattr(self, name, Projection.of(c, name, bias, dtype, index))
        self.scale = c.attention_scale
        self.window = c.window(index)

    def forward(self, x, pending, rope, k_cache, v_cache, batch, attention) -> torch.Tensor:
        """As llama.DecoderLayer.forward: x is the residual stream, updated in place; pending
        (the previous layer's output) is added to it first; returns this layer's output."""
        c, native = self.c, batch.use_native_kernels
        T = x.shape[0]
        qkv = self.qkv_proj.forward(self.input_layernorm.forward(x, pending, native), batch)
        if c.qk_norm:
            layer_ops.rms_norm_heads(qkv, self.q_norm.multiplier, self.k_norm.multiplier, c.num_heads,
                                     c.num_kv_heads, c.head_dim, self.q_norm.eps, native)
        q, k, v = layer_ops.rope_write_kv(qkv, batch.positions, rope[0], rope[1], c.num_heads, c.num_kv_heads,
                                          c.head_dim, attention.slot_mapping, k_cache, v_cache, native)
        attn = paged_attention(q, k, v, k_cache, v_cache, attention, self.scale, self.window,
                               c.attention_softcap)
        attn = self.post_attention_layernorm.forward(self.o_proj.forward(attn.view(T, -1), batch), None, native)
        h = self.pre_feedforward_layernorm.forward(x, attn, native)
        mlp = self.down_proj.forward(layer_ops.gelu_tanh_mul(self.gate_up_proj.forward(h, batch)), batch)
        return self.post_feedforward_layernorm.forward(mlp, None, native)


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, c, hf_config, dtype: torch.dtype, max_positions: int):
        super().__init__(c, hf_config, dtype, max_positions)
        # Rounded to the weights' dtype from fp32, as transformers does.
        self.register_buffer("embedding_scale", torch.tensor(c.embedding_scale).to(dtype), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, batch) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embedding_scale
        add_embedding_lora(x, input_ids, batch, self.embedding_scale)  # peft scales it as the module scales
        return self.run_layers(x, kv_caches, batch)
