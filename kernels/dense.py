"""Dense projections y = x @ W.T + b, with the weight packed once for the CPU's GEMM.

Semantics: dense_linear(x [..., in], pack_weight(W [out, in]), b [out] | None) equals
F.linear(x, W, b). On CPU with bf16 the weight is packed once at load: in AMX tile order for
the native kernels where the shape fits and the CPU has AMX (kernels/csrc/amx_gemm.c) or
AVX-512 BF16 (kernels/csrc/avx512_bf16_gemm.c, decode sizes only), else in oneDNN's blocked
layout, which runs a single-token decode about 1.5x faster than F.linear on the plain layout
(that re-packs the weight on every call). fp32 and non-CPU tensors keep the
plain layout, where F.linear is already as fast.

Int4Weight is the weight-only 4-bit form used where a model's outputs are only proposals (the
speculative draft): dense_linear(x, Int4Weight(W), b) equals F.linear(x, W', b) with W' the
weight rounded to 16 levels per group of GROUP_SIZE inputs (scale and offset per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

# Measured on this repository's CPU, weights streamed from memory (24 distinct copies), one
# row, bf16: Qwen2.5-0.5B's gate/up weight 896x9728 takes 973 us through the packed bf16 GEMM,
# 675 us through torch's int8 weight-only kernel and 293 us through its int4 one (down
# 4864x896: 402, 212, 145 us). The int4 kernel's cost grows with the rows (489 us at 4 rows)
# while the GEMM's hardly moves, so larger batches take the dense copy.
GROUP_SIZE = 32
INT4_MAX_ROWS = 4


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def int4_available(device: torch.device | str = "cpu") -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack_weight(weight: torch.Tensor, int4: bool = False) -> torch.Tensor | TiledWeight | Int4Weight:
    """Return the weight in the layout dense_linear runs fastest with (maybe the same tensor);
    int4: quantized where the kernel exists and the shape allows it."""
    if int4 and int4_available(weight.device) and weight.shape[0] % 16 == 0 and weight.shape[1] % GROUP_SIZE == 0:
        return Int4Weight(weight)
    if TiledWeight.fits(weight) and native.tiled_gemm_kernel() is not None:
        return TiledWeight(weight)
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _mkldnn_linear_available():
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    return weight


class TiledWeight:
    """A bf16 weight [out, in] in the tile order of kernels/csrc/amx_gemm.c: [out/16, in/32,
    16, 16, 2], for each block of 16 outputs and 32 inputs the pairs of inputs AMX multiplies
    together; kernels/csrc/avx512_bf16_gemm.c reads the same layout a 64-byte row at a time.
    Measured against oneDNN's packed layout (weights streamed from memory, bf16), with AMX:
    SmolLM2's 576x576 projection 29 vs 51 us at one row, 31 vs 52 us at 16; its 3072x576
    gate/up 123 vs 159 us. At prefill sizes oneDNN is faster there (a 1000-token prefill
    step's projections: 130 vs 160 ms), so with AMX calls of MAX_ROWS rows or more take a
    oneDNN-packed copy, and a bf16 weight is held twice. With AVX-512 BF16 (AMD EPYC, 2
    threads; bench/dense_gemm.py) the kernel takes 0.6-0.9x oneDNN's time at decode sizes and
    0.96-1.04x at prefill sizes (256 and 1024 rows; the 49152-row head 1.09x at 1024), so it
    runs every call and the weight is held once."""

    BLOCK_OUT, BLOCK_IN = 16, 32
    KERNELS = ("amx", "avx512_bf16")
    MAX_ROWS = 128  # AMX: calls of more rows take the oneDNN copy

    def __init__(self, weight: torch.Tensor, kernel: str | None = None):
        """kernel: "amx" or "avx512_bf16" (native.tiled_gemm_kernel(): the CPU's, by default)."""
        if not self.fits(weight):
            raise ValueError(f"tile packing needs a bf16 CPU weight with out % {self.BLOCK_OUT} == 0 and "
                             f"in % {self.BLOCK_IN} == 0, got {tuple(weight.shape)} {weight.dtype}")
        n, k = weight.shape
        self.kernel = kernel or native.tiled_gemm_kernel()
        if self.kernel not in self.KERNELS:
            raise ValueError("no native kernel runs tile-packed weights on this CPU (it has neither AMX nor AVX-512 BF16)")
        self.out_features, self.in_features = n, k
        self.tiles = weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()
        self.large = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
                      if self.kernel == "amx" and _mkldnn_linear_available() else None)

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
                and weight.shape[0] % cls.BLOCK_OUT == 0 and weight.shape[1] % cls.BLOCK_IN == 0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"a tile-packed weight multiplies bf16 activations, got {x.dtype}")
        rows = x.numel() // x.shape[-1]
        if rows >= self.MAX_ROWS and self.large is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.large, bias, "none", [], "")
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1 or (rows > 1 and x2.stride(0) < x2.shape[1]):
            x2 = x2.contiguous()
        y = torch.empty(rows, self.out_features, dtype=x.dtype)
        if rows:
            b = None if bias is None else bias.to(torch.bfloat16).contiguous()
            native.tiled_gemm(self.kernel, x2, self.tiles, self.out_features, b, y)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Weight:
    """Asymmetric 4-bit weight, one (scale, offset) per output row and group of GROUP_SIZE
    inputs: w = (q - 8) * scale + offset, q in 0..15 (the layout of torch's int4 kernel); plus
    a dense packed copy of the same dequantized values for calls with many rows, so both paths
    compute one function."""

    def __init__(self, weight: torch.Tensor):
        out_features, in_features = weight.shape
        if in_features % GROUP_SIZE or out_features % 16:
            raise ValueError(f"int4 weights need in_features divisible by {GROUP_SIZE} and out_features by 16, "
                             f"got {in_features}, {out_features}")
        w = weight.detach().float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-6)
        q = ((w - low) / scale).round().clamp(0, 15)
        offset = low + 8 * scale
        # The kernel reads scale and offset in the activation dtype: round them first so the
        # dense copy below is made of exactly the values the kernel uses.
        scale, offset = scale.to(weight.dtype).float(), offset.to(weight.dtype).float()
        self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features).to(torch.int32), 1)
        self.scales_and_zeros = torch.cat([scale, offset], -1).transpose(0, 1).contiguous().to(weight.dtype)
        self.dense = pack_weight(((q - 8) * scale + offset).reshape(out_features, in_features).to(weight.dtype))


def dense_linear(x: torch.Tensor, packed: torch.Tensor | TiledWeight | Int4Weight,
                 bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(packed, TiledWeight):
        return packed.linear(x, bias)
    if isinstance(packed, Int4Weight):
        rows = x.numel() // x.shape[-1]
        if rows > INT4_MAX_ROWS:
            return dense_linear(x, packed.dense, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, x.shape[-1]).contiguous(), packed.q,
                                                       GROUP_SIZE, packed.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, packed, bias)


def row_norms_sq(packed: torch.Tensor | TiledWeight | Int4Weight, in_features: int) -> torch.Tensor:
    """||W[o]||^2 for every output row o of a packed weight, fp32 (DoRA needs them). Read from
    the layout where it can be (plain, AMX tiles: one pass); oneDNN's blocked layout is opaque,
    so there the rows come out of the projection itself, a block of unit inputs at a time
    (exact: one product per output, accumulated in fp32)."""
    if isinstance(packed, Int4Weight):
        return row_norms_sq(packed.dense, in_features)
    if isinstance(packed, TiledWeight):  # tiles [out/16, in/32, 16 inputs, 16 outputs, 2 inputs]
        t = packed.tiles.view(packed.tiles.shape[0], -1, 32)  # the last axis holds (output, input pair)
        sums = torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).square()  # faster than over (1, 2, 4)
        return sums.view(-1, 16, 2).sum(-1).reshape(-1)
    if not packed.is_mkldnn:
        return torch.linalg.vector_norm(packed, dim=1, dtype=torch.float32).square()
    total = None
    for k in range(0, in_features, 256):
        n = min(256, in_features - k)
        units = torch.zeros(n, in_features, dtype=torch.bfloat16)
        units[:, k:k + n].fill_diagonal_(1)
        part = dense_linear(units, packed, None).float().square().sum(0)
        total = part if total is None else total + part
    return total


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
