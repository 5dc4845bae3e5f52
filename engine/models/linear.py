"""The one place every LoRA-targetable projection goes through.

A projection may fuse several of the checkpoint's linears (q/k/v, gate/up) into one matmul;
`output_slices` remembers which rows came from which module so adapter weights can be
placed on the matching output range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Module):
    def __init__(self, in_features: int, output_slices: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.output_slices = dict(output_slices)  # module name -> output width, in order
        self.out_features = sum(output_slices.values())
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:  # noqa: ARG002 (batch: LoRA segments)
        return F.linear(x, self.weight, self.bias)
