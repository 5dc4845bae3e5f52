"""The pointwise steps of a Llama-family decoder layer: RMSNorm (with the residual add
fused in; per head for q and k), RoPE + KV-cache write, and SiLU- (or GELU-) gated multiply.

Each function has a plain torch reference (written like transformers computes it, so bf16
rounding happens at the same points) and, on CPU, a native kernel that does the same in one
pass (kernels/csrc/pointwise.c); `native=False` forces the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native as _native
from .attention import write_slots


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual_delta: torch.Tensor | None = None,
             native: bool = True) -> torch.Tensor:
    """Semantics: if residual_delta is given, first x += residual_delta (in place: x is the
    residual stream). Returns weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and
    rounded to x's dtype before the weight (Llama), or, for an fp32 weight, after it (Gemma,
    whose weight here is 1 + its checkpoint's). x: [rows, width] contiguous."""
    if native and x.is_contiguous() and _native.usable(x, weight):
        out = torch.empty_like(x)
        _native.rms_norm(x, None if residual_delta is None else residual_delta.contiguous(), weight, out, eps)
        return out
    if residual_delta is not None:
        x.add_(residual_delta)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if weight.dtype == torch.float32:
        return (normed * weight).to(x.dtype)
    return weight * normed.to(x.dtype)


def rms_norm_heads(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, eps: float, native: bool = True) -> None:
    """Semantics: the q and k heads of qkv [T, (heads + 2*kv_heads) * d] RMS-normed in place,
    each over its d values, with q_weight / k_weight [d], rounded as rms_norm rounds (Qwen3:
    before the weight; Gemma 3, whose weights come as fp32 1 + weight: after it)."""
    if native and qkv.stride(-1) == 1 and _native.usable(qkv, q_weight, k_weight) and head_dim <= 512:
        _native.rms_norm_heads(qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps)
        return
    qk = qkv[:, :(num_heads + num_kv_heads) * head_dim].view(qkv.shape[0], -1, head_dim)
    weight = torch.cat((q_weight.expand(num_heads, -1), k_weight.expand(num_kv_heads, -1)))
    normed = F.rms_norm(qk.float(), (head_dim,), eps=eps)
    qk.copy_(normed * weight if weight.dtype == torch.float32 else weight * normed.to(qkv.dtype))


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int, slot_mapping: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, native: bool = True):
    """Semantics: qkv [T, (heads + 2*kv_heads) * d] holds q, k, v heads per token. Rotates q and
    k by each token's position (HF rotate-half RoPE; cos/sin tables [max_pos, r]: the first r <= d
    dims of each head rotate, the rest pass through, as with Phi-4-mini's partial_rotary_factor)
    and writes k and v to the caches [blocks, kv_heads, block_size, d] at slot_mapping [T].
    Returns q [T, heads, d], k, v [T, kv_heads, d] (views; the native path rotates qkv in place)."""
    T = qkv.shape[0]
    if native and qkv.is_contiguous() and _native.usable(qkv, cos, k_cache):
        _native.rope_write_kv(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim, slot_mapping,
                              k_cache, v_cache)
        heads = qkv.view(T, num_heads + 2 * num_kv_heads, head_dim)
        return heads[:, :num_heads], heads[:, num_heads:num_heads + num_kv_heads], heads[:, num_heads + num_kv_heads:]
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(T, -1, head_dim)
    c = cos.index_select(0, positions).unsqueeze(1)
    s = sin.index_select(0, positions).unsqueeze(1)
    rotary = cos.shape[1]
    x, half = qk[..., :rotary], rotary // 2
    rotated = x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s
    qk = rotated if rotary == head_dim else torch.cat((rotated, qk[..., rotary:]), dim=-1)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(T, num_kv_heads, head_dim)
    write_slots(k_cache, slot_mapping, k)
    write_slots(v_cache, slot_mapping, v)
    return q, k, v


def silu_mul(gate_up: torch.Tensor, native: bool = True) -> torch.Tensor:
    """Semantics: gate_up [T, 2*I] -> silu(gate_up[:, :I]) * gate_up[:, I:]."""
    width = gate_up.shape[1] // 2
    if native and gate_up.is_contiguous() and width <= _native.MAX_ROW_WIDTH and _native.usable(gate_up):
        out = torch.empty(gate_up.shape[0], width, dtype=gate_up.dtype)
        _native.silu_mul(gate_up, out)
        return out
    gate, up = gate_up.split(width, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Semantics: gate_up [T, 2*I] -> gelu_tanh(gate_up[:, :I]) * gate_up[:, I:] (Gemma's MLP;
    GELU with the tanh approximation, as transformers' gelu_pytorch_tanh)."""
    gate, up = gate_up.split(gate_up.shape[1] // 2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
