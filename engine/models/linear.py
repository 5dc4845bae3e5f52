"""The one place every LoRA-targetable projection goes through.

A projection may fuse several of the checkpoint's linears (q/k/v, gate/up) into one matmul;
`output_slices` remembers which rows came from which module so adapter weights can be
placed on the matching output range.
"""

from __future__ import annotations

import torch
from torch import nn

from loragate.kernels.dense import Int4Weight, dense_linear, pack_weight, row_norms_sq
from loragate.kernels.lora import LoraModule, LoraModules, add_lora_modules, add_lora_rows

from .slot_rows import apply_row_terms


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
        # Per slot, what some adapters (DoRA, lora_bias) do to their rows: y*s + t (slot_rows.py).
        self.row_scale: torch.Tensor | None = None  # [slots + 1, out]
        self.row_shift: torch.Tensor | None = None
        self._row_norms_sq: torch.Tensor | None = None
        self._lora_pool = None  # the pool _lora_modules was built for
        self._lora_modules: dict[frozenset[str], LoraModules] = {}  # by the step's targeted modules

    @classmethod
    def of(cls, arch, name: str, bias: bool, dtype: torch.dtype, layer_index: int) -> "Projection":
        """Projection `name` of a decoder layer of `arch` (a ModelArchConfig): the linear
        modules it computes, from arch.linear_modules."""
        modules = {n: m for n, m in arch.linear_modules.items() if m.projection == name}
        fan_in = next(iter(modules.values())).fan_in
        return cls(fan_in, {n: m.fan_out for n, m in modules.items()}, bias, dtype, layer_index)

    def slice_range(self, name: str) -> tuple[int, int]:
        start = 0
        for s, width in self.output_slices.items():
            if s == name:
                return start, start + width
            start += width
        raise KeyError(name)

    def move_to(self, device: torch.device) -> None:
        """Before pack(): weight and bias are plain attributes, which nn.Module.to() skips."""
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)

    def pack(self, int4: bool = False) -> None:
        """Switch to the GEMM-friendly weight layout once loading is done (int4: weight-only
        quantized, for a speculative draft); the plain copy is dropped when the packed one is
        a different tensor, so weights are held once."""
        self.packed = pack_weight(self.weight, int4)
        self.weight = None

    @property
    def row_norms_sq(self) -> torch.Tensor:
        """||W||^2 per output row, fp32, for DoRA (slot_rows.py): taken from the packed weight on
        first use, so a model that serves no DoRA adapter never pays for it. It is a pass over
        the weights, in the step that loads the engine's first DoRA adapter: about 0.15 s for
        SmolLM2-135M and 3-4 s for Qwen2.5-1.5B on this CPU (done at load instead, every
        start would pay about 3 s for that model)."""
        if self._row_norms_sq is None:
            self._row_norms_sq = row_norms_sq(self.packed, self.in_features)
        return self._row_norms_sq

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        y = dense_linear(x, self.packed, self.bias)
        lora = batch.lora
        if lora is not None:
            mods = self.lora_modules(lora.pool, lora.modules)
            if mods.modules and lora.row_slots is not None:
                add_lora_rows(y, x, mods, lora.row_slots, lora.rank)
                if lora.row_term_slots is not None:
                    apply_row_terms(y, self, lora)
            elif mods.modules:
                folded = add_lora_modules(y, x, mods, lora.plan, lora.rank, batch.use_native_kernels,
                                          self.row_scale, self.row_shift)
                if lora.row_terms and not folded:
                    apply_row_terms(y, self, lora)
        return y

    def lora_modules(self, pool, targeted: frozenset[str]) -> LoraModules:
        """This projection's modules that some adapter of the step targets, with their slices
        of the pool's stacks; cached, since a step's targeted set repeats across steps."""
        if pool is not self._lora_pool:
            self._lora_pool, self._lora_modules = pool, {}
        mods = self._lora_modules.get(targeted)
        if mods is None:
            start, found = 0, []
            for name, width in self.output_slices.items():
                if name in targeted:
                    found.append(LoraModule(start, pool.a[name][self.layer_index], pool.b[name][self.layer_index]))
                start += width
            mods = self._lora_modules[targeted] = LoraModules(found)
        return mods
