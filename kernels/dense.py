"""Dense projections y = x @ W.T + b, with the weight packed once for the CPU's GEMM.

Semantics: dense_linear(x [..., in], pack_weight(W [out, in]), b [out] | None) equals
F.linear(x, W, b). On CPU with bf16, oneDNN's blocked weight layout (packed once at load)
runs a single-token decode about 1.5x faster than F.linear on the plain layout, which
re-packs the weight on every call; fp32 and non-CPU tensors keep the plain layout, where
F.linear is already as fast (measured: bench/engine.py's notes in README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Return the weight in the layout dense_linear runs fastest with (maybe the same tensor)."""
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _mkldnn_linear_available():
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    return weight


def dense_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, packed, bias)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
