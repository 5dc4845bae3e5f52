"""Per-slot terms some adapters add to their output rows after the LoRA term: y = y*s + t.

- DoRA (peft's use_dora): peft computes a module as y = b + s * (W x + B A x), where
  s = m / ||W + B A|| row by row (m: the adapter's magnitude vector, one entry per output; B
  carries the LoRA scaling), and the base bias b is not rescaled: t = b (1 - s). s depends on
  the base weights only through W, so it is computed once per adapter and engine
  (`dora_scales`). ||W + BA||^2 per row is ||W||^2 + 2 (W A^T) . B + ||B A||^2: the first term
  comes from the packed weight, once per engine (Projection.row_norms_sq); the second runs A's
  r rows through the projection; the third is B (A A^T) . B.
- lora_bias (a bias on lora_B, as LoRAs extracted from full fine-tunes have): s = 1 and
  t = scaling * that bias.

`SlotRowTerms` keeps each slot's s and t on every projection ([slots + 1, out], model dtype,
fused like the weight: q|k|v, gate|up; a table no adapter has needed yet is None); the last
row (s = 1, t = 0) stands for the rows of other adapters and of the base model. The native
LoRA kernels apply a segment's s and t as they add its LoRA term (kernels/lora.py,
add_lora_modules); where they do not take every such segment, `apply_row_terms` rescales
and shifts those rows afterwards: in a decode step one gathered multiply (and add) per
projection, in a prefill step one per segment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loragate.kernels.dense import dense_linear

if TYPE_CHECKING:  # linear.py imports this module
    from .linear import Projection


class SlotRowTerms:
    """The pool's side of these terms (adapters/pool.py calls `write` when a slot loads an
    adapter that has them)."""

    def __init__(self, model, num_slots: int):
        self.model, self.num_slots = model, num_slots
        # Tables made so far: a CUDA graph captured before a table existed does not apply it.
        self.tables_made = 0
        self.projections = [p for layer in model.layers for p in _projections(layer)]

    @torch.no_grad()
    def prepare(self, weights) -> None:
        """DoRA's s for an adapter's LoraWeights, once per adapter version (and engine: it
        depends on the base weights). LLMEngine.prepare_adapter_weights runs it outside the
        engine's loop; `write` does it otherwise."""
        if weights.magnitudes and weights.dora_scales is None:
            weights.dora_scales = dora_scales(self.model, weights)

    def write(self, slot: int, weights) -> None:
        self.prepare(weights)
        scales, shifts = weights.dora_scales or {}, weights.lora_biases
        device = self.model.device
        for proj in self.projections:
            s, t = torch.ones(proj.out_features), torch.zeros(proj.out_features)  # host, like the adapter's tensors
            for name in proj.output_slices:
                cols = slice(*proj.slice_range(name))
                if (proj.layer_index, name) in scales:
                    s[cols] = scales[(proj.layer_index, name)]
                if (proj.layer_index, name) in shifts:
                    t[cols] = shifts[(proj.layer_index, name)]
            if proj.bias is not None:  # y*s + b*(1-s): the base bias is not rescaled
                t += proj.bias.float().cpu() * (1 - s)
            # Each table is made with the first adapter that needs it (none: nothing to apply).
            if proj.row_scale is None and not s.eq(1).all():
                proj.row_scale = torch.ones(self.num_slots + 1, proj.out_features, dtype=self.model.dtype, device=device)
                self.tables_made += 1
            if proj.row_shift is None and t.any():
                proj.row_shift = torch.zeros(self.num_slots + 1, proj.out_features, dtype=self.model.dtype, device=device)
                self.tables_made += 1
            if proj.row_scale is not None:
                proj.row_scale[slot] = s
            if proj.row_shift is not None:
                proj.row_shift[slot] = t


def dora_scales(model, weights) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> s [out_features] fp32 for a DoRA adapter's LoraWeights."""
    scales = {}
    for (layer, name), magnitude in weights.magnitudes.items():
        proj = _projection_of(model.layers[layer], name)
        start, end = proj.slice_range(name)
        a, b = weights.modules[(layer, name)]  # fp32, on the host; b scaled
        wa = dense_linear(a.to(model.device, model.dtype), proj.packed, None).float()[:, start:end].cpu()  # (W A^T)^T
        norm_sq = proj.row_norms_sq[start:end].cpu() + 2 * (b * wa.T).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
        scales[(layer, name)] = magnitude / norm_sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    return scales


def _projections(layer) -> list[Projection]:
    """A decoder layer's projections (sparse-expert models have no MLP ones)."""
    from .linear import Projection

    return [p for p in layer.children() if isinstance(p, Projection)]


def _projection_of(layer, module_name: str) -> Projection:
    for proj in _projections(layer):
        if module_name in proj.output_slices:
            return proj
    raise KeyError(module_name)


def apply_row_terms(y: torch.Tensor, proj: Projection, lora) -> None:
    """y = y*s + t, in place, for the rows of the step's segments whose slots have row terms
    (lora.row_terms: first row, end row, slot). A short batch (decode) gathers s and t for
    every batch row (lora.row_term_slots: its slot, or the last row for the others) and does
    all rows at once; a long one (prefill) does each segment with its slot's rows, rather
    than gather one per token."""
    scale, shift, rows = proj.row_scale, proj.row_shift, lora.row_term_slots
    if rows is not None:
        if scale is not None:
            y.mul_(scale.index_select(0, rows))
        if shift is not None:
            y.add_(shift.index_select(0, rows))
        return
    for first, end, slot in lora.row_terms:
        part = y[first:end]
        if scale is not None:
            part.mul_(scale[slot])
        if shift is not None:
            part.add_(shift[slot])
