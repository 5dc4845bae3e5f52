"""OLMo 2 and 3's decoder (Olmo2ForCausalLM, Olmo3ForCausalLM: OLMo-2 1B to 32B, OLMo-3 7B
and 32B) on the Llama-family machinery of llama.py. What differs, computed where transformers
computes it so bf16 rounds alike:
- norms come after the sublayers, not before: h = x + norm(attention(x)), then
  out = h + norm(mlp(h)); the attention and the MLP read the residual stream itself;
- q and k are RMS-normed over the whole projection (all heads together) before RoPE;
- every RMSNorm multiplies by its weight in fp32 and rounds once;
- OLMo 3: three of every four layers attend over a sliding window, with their own RoPE
  parameters (llama.py's per-layer-type tables).
"""

from __future__ import annotations

import torch
from torch import nn

from loragate.kernels import layer_ops
from loragate.kernels.attention import paged_attention

from .linear import Projection
from .arch import projection_biases
from .llama import LlamaForCausalLM


class Olmo2RMSNorm(nn.Module):
    """weight * (x / rms(x)), in fp32, rounded once (the fp32-weight mode of layer_ops.rms_norm)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self._fp32: torch.Tensor | None = None  # the weight in fp32, made once the weights are loaded

    def forward(self, x: torch.Tensor, residual_delta: torch.Tensor | None = None, native: bool = True) -> torch.Tensor:
        if self._fp32 is None or self._fp32.device != self.weight.device:
            self._fp32 = self.weight.float()
        return layer_ops.rms_norm(x, self._fp32, self.eps, residual_delta, native)

    def normalize_in_place(self, view: torch.Tensor, native: bool) -> None:
        """A column range of a wider tensor (q or k inside qkv), normed over that range."""
        view.copy_(self.forward(view.contiguous(), None, native))


class Olmo2DecoderLayer(nn.Module):
    # Checkpoint module name -> attribute: the loader fills these norms' weights.
    NORMS = {"post_attention_layernorm": "post_attention_layernorm",
             "post_feedforward_layernorm": "post_feedforward_layernorm",
             "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}

    def __init__(self, c, dtype: torch.dtype, index: int):
        super().__init__()
        self.c = c
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.post_attention_layernorm = Olmo2RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.post_feedforward_layernorm = Olmo2RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.q_norm = Olmo2RMSNorm(q, c.rms_norm_eps, dtype)
        self.k_norm = Olmo2RMSNorm(kv, c.rms_norm_eps, dtype)
        for name, bias in projection_biases(c).items():
            setattr(self, name, Projection.of(c, name, bias, dtype, index))
        self.scale = c.head_dim ** -0.5
        self.window = c.window(index)

    def forward(self, x, pending, rope, k_cache, v_cache, batch, attention) -> torch.Tensor:
        """As llama.DecoderLayer.forward: x is the residual stream, updated in place; pending
        (the previous layer's output, already normed) is added to it first; returns this
        layer's output."""
        c, native = self.c, batch.use_native_kernels
        T, q = x.shape[0], c.num_heads * c.head_dim
        if pending is not None:
            x.add_(pending)
        qkv = self.qkv_proj.forward(x, batch)
        self.q_norm.normalize_in_place(qkv[:, :q], native)
        self.k_norm.normalize_in_place(qkv[:, q:q + c.num_kv_heads * c.head_dim], native)
        q_heads, k, v = layer_ops.rope_write_kv(qkv, batch.positions, rope[0], rope[1], c.num_heads, c.num_kv_heads,
                                                c.head_dim, attention.slot_mapping, k_cache, v_cache, native)
        attn = paged_attention(q_heads, k, v, k_cache, v_cache, attention, self.scale, self.window)
        x.add_(self.post_attention_layernorm.forward(self.o_proj.forward(attn.view(T, -1), batch), None, native))
        mlp = self.down_proj.forward(layer_ops.silu_mul(self.gate_up_proj.forward(x, batch), native), batch)
        return self.post_feedforward_layernorm.forward(mlp, None, native)


class Olmo2ForCausalLM(LlamaForCausalLM):
    layer_class = Olmo2DecoderLayer
    norm_class = Olmo2RMSNorm
