"""StarCoder2's decoder (Starcoder2ForCausalLM: StarCoder2 3B, 7B and 15B, code models trained
to fill in the middle, engine/fill_in_middle.py) on the Llama-family machinery of llama.py.
What differs, computed as transformers computes it:
- LayerNorm with a bias (norm_epsilon), not RMSNorm, before the attention, the MLP and the head;
- a plain MLP, c_proj(gelu_tanh(c_fc(x))), no gate; every projection has a bias (use_bias);
- a sliding window on every layer (4,096 positions), so KV blocks behind it are given back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loragate.kernels import layer_ops
from loragate.kernels.attention import paged_attention

from ..errors import ModelConfigError
from .arch import SUPPORTED_ROPE_TYPES, check_rope, common_fields, layer_windows, projection_biases
from .linear import Projection
from .llama import LlamaForCausalLM


def starcoder2_arch(cls, hf):
    """ModelArchConfig for a Starcoder2Config; refuses what this decoder does not compute."""
    if hf.hidden_act != "gelu_pytorch_tanh":
        raise ModelConfigError(f"hidden_act {hf.hidden_act!r} is not supported (only gelu_pytorch_tanh)")
    check_rope(hf, SUPPORTED_ROPE_TYPES)
    return cls(**common_fields(hf), qkv_bias=hf.use_bias, o_bias=hf.use_bias, mlp_bias=hf.use_bias, plain_mlp=True,
               layer_windows=layer_windows(hf))


class LayerNorm(nn.Module):
    """x += residual_delta (the previous sublayer's output), then LayerNorm(x) with weight and bias."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual_delta: torch.Tensor | None = None, native: bool = True) -> torch.Tensor:
        if residual_delta is not None:
            x.add_(residual_delta)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Starcoder2DecoderLayer(nn.Module):
    NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}

    def __init__(self, c, dtype: torch.dtype, index: int):
        super().__init__()
        self.c = c
        self.input_layernorm = LayerNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.post_attention_layernorm = LayerNorm(c.hidden_size, c.rms_norm_eps, dtype)
        for name, bias in projection_biases(c).items():
            setattr(self, name, Projection.of(c, name, bias, dtype, index))
        self.scale = c.head_dim ** -0.5
        self.window = c.window(index)

    def forward(self, x, pending, rope, k_cache, v_cache, batch, attention) -> torch.Tensor:
        """As llama.DecoderLayer.forward: x is the residual stream, updated in place; pending
        (the previous layer's output) is added to it first; returns this layer's MLP output."""
        c, native = self.c, batch.use_native_kernels
        T = x.shape[0]
        qkv = self.qkv_proj.forward(self.input_layernorm.forward(x, pending, native), batch)
        q, k, v = layer_ops.rope_write_kv(qkv, batch.positions, rope[0], rope[1], c.num_heads, c.num_kv_heads,
                                          c.head_dim, attention.slot_mapping, k_cache, v_cache, native)
        attn = paged_attention(q, k, v, k_cache, v_cache, attention, self.scale, self.window)
        h = self.post_attention_layernorm.forward(x, self.o_proj.forward(attn.view(T, -1), batch), native)
        return self.down_proj.forward(F.gelu(self.up_proj.forward(h, batch), approximate="tanh"), batch)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    layer_class = Starcoder2DecoderLayer
    norm_class = LayerNorm
