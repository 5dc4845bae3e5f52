"""The one place every LoRA-targetable projection goes through.

A projection may fuse several of the checkpoint's linears (q/k/v, gate/up) into one matmul;
`output_slices` remembers which rows came from which module so adapter weights can be
placed on the matching output range.
"""

from __future__ import annotations

import torch
from torch import nn

from loragate.kernels.dense import Int4Weight, dense_linear, pack_weight
from loragate.kernels.lora import add_lora


class Projection(nn.Module):
    def __init__(self, in_features: int, output_slices: dict[str, int], bias: bool, dtype: torch.dtype,
                 layer_index: int = 0):
        super().__init__()
        self.layer_index = layer_index
        self.in_features = in_features
        self.output_slices = dict(output_slices)  # module name -> output width, in order
        self.out_features = sum(output_slices.values())
        # Filled by the loader, then replaced by `packed` (see pack()).
        self.weight: torch.Tensor | None = torch.empty(self.out_features, in_features, dtype=dtype)
        self.bias = torch.zeros(self.out_features, dtype=dtype) if bias else None
        self.packed: torch.Tensor | Int4Weight | None = None

    def slice_range(self, name: str) -> tuple[int, int]:
        start = 0
        for s, width in self.output_slices.items():
            if s == name:
                return start, start + width
            start += width
        raise KeyError(name)

    def pack(self, int4: bool = False) -> None:
        """Switch to the GEMM-friendly weight layout once loading is done (int4: weight-only
        quantized, for a speculative draft); the plain copy is dropped when the packed one is
        a different tensor, so weights are held once."""
        self.packed = pack_weight(self.weight, int4)
        self.weight = None

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        y = dense_linear(x, self.packed, self.bias)
        lora = batch.lora
        if lora is not None:
            r, layer = lora.rank, self.layer_index
            start = 0
            for name, width in self.output_slices.items():
                if name in lora.modules:
                    add_lora(y[:, start:start + width], x, lora.pool.a[name][layer], lora.pool.b[name][layer],
                             lora.plan, r, batch.use_native_kernels)
                start += width
        return y
