"""DoRA adapters (peft's use_dora) at inference.

peft computes a DoRA module as y = b + s * (W x + B A x), where s = m / ||W + B A|| row by row
(m: the adapter's magnitude vector, one entry per output; B carries the LoRA scaling; the
bias b is not rescaled). s depends on the base weights only through W, so it is computed once
per adapter and engine (`dora_scales`) and kept in the slot pool next to A and B. A step then
adds the LoRA term as for any adapter and multiplies the DoRA segments' output rows by their
slots' s (`apply_dora`): one multiply per projection in a decode step.

||W + BA||^2 per row is ||W||^2 + 2 (W A^T) . B + ||B A||^2. The first term is kept at load
(Projection.row_norms_sq), because the packed weight layouts are not read row by row; the
second runs A's r rows through the projection; the third is B (A A^T) . B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loragate.kernels.dense import dense_linear

if TYPE_CHECKING:  # linear.py imports this module
    from .linear import Projection


class DoraSlots:
    """The pool's DoRA side (adapters/pool.py calls it): computes an adapter's row scales and
    writes a slot's into each projection's `dora_scale` [slots, out] (model dtype), fused like
    its weight (q|k|v, gate|up), so a segment's rows are rescaled in one multiply; with a bias,
    `dora_bias` = b*(1-s) restores the unscaled bias. Modules (or layers) a slot's adapter
    leaves alone have s = 1, which changes nothing."""

    def __init__(self, model, num_slots: int):
        self.model, self.num_slots = model, num_slots
        self.projections = [p for layer in model.layers
                            for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]

    def scales(self, weights) -> dict[tuple[int, str], torch.Tensor]:
        return dora_scales(self.model, weights)

    def write(self, slot: int, scales: dict[tuple[int, str], torch.Tensor]) -> None:
        for proj in self.projections:
            if proj.dora_scale is None:  # made with the first DoRA adapter; the extra last row
                # (s = 1, no bias term) stands for rows of other adapters and the base model
                proj.dora_scale = torch.ones(self.num_slots + 1, proj.out_features, dtype=self.model.dtype)
                if proj.bias is not None:
                    proj.dora_bias = torch.zeros(self.num_slots + 1, proj.out_features, dtype=self.model.dtype)
            row = torch.ones(proj.out_features)
            for name in proj.output_slices:
                scale = scales.get((proj.layer_index, name))
                if scale is not None:
                    row[slice(*proj.slice_range(name))] = scale
            proj.dora_scale[slot] = row
            if proj.bias is not None:  # y*s + b*(1-s): the bias is not rescaled
                proj.dora_bias[slot] = proj.bias.float() * (1 - row)


def dora_scales(model, weights) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> s [out_features] fp32 for a DoRA adapter's LoraWeights."""
    scales = {}
    for (layer, name), magnitude in weights.magnitudes.items():
        proj = _projection_of(model.layers[layer], name)
        start, end = proj.slice_range(name)
        a, b = weights.modules[(layer, name)]  # fp32; b scaled
        wa = dense_linear(a.to(model.dtype), proj.packed, None).float()[:, start:end]  # (W A^T)^T
        norm_sq = proj.row_norms_sq[start:end] + 2 * (b * wa.T).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
        scales[(layer, name)] = magnitude / norm_sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    return scales


def _projection_of(layer, module_name: str) -> Projection:
    for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
        if module_name in proj.output_slices:
            return proj
    raise KeyError(module_name)


def apply_dora(y: torch.Tensor, proj: Projection, lora) -> None:
    """Rescale, in place, the rows of the step's DoRA segments (lora.dora: first row, end row,
    slot). A short batch (decode) gathers a scale row for every batch row (lora.dora_rows: its
    slot, or the extra row of ones) and multiplies once; a long one (prefill) multiplies each
    DoRA segment by its slot's row, rather than gather a row per token."""
    if lora.dora_rows is not None:
        y.mul_(proj.dora_scale.index_select(0, lora.dora_rows))
        if proj.bias is not None:
            y.add_(proj.dora_bias.index_select(0, lora.dora_rows))
        return
    for first, end, slot in lora.dora:
        part = y[first:end]
        part.mul_(proj.dora_scale[slot])
        if proj.bias is not None:
            part.add_(proj.dora_bias[slot])
