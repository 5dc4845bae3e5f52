"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): each token's router picks its top-k of
E SiLU-gated experts, whose outputs are summed with the router's weights.

Computed as transformers computes it, so bf16 rounds at the same points: router logits in the
model's dtype, softmax in fp32, top-k (renormalised to sum to 1 where the model does), then
expert by expert in ascending order each one's tokens through gate/up, SiLU and down, scaled
by their weight and added into the output. Only the experts some token picked run, each on
just its tokens, through the same packed GEMMs as the dense projections.

The experts are not LoRA targets: transformers 5 keeps them as 3-D parameters, which peft
adapts only through target_parameters (refused, adapters/config.py). Adapters of these models
adapt the attention projections. The step's shapes depend on the routing, so these models run
without CUDA graphs.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from loragate.kernels import layer_ops
from loragate.kernels.dense import dense_linear, pack_weight

# Checkpoint names of the router and of expert e's linears, as the models are published (and
# as transformers 5 saves them): module -> (this block's tensor, row half of gate_up or None).
_EXPERT_NAME = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<linear>\w+)")
_EXPERT_LINEARS = {"gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", None),
                   "w1": ("gate_up", 0), "w3": ("gate_up", 1), "w2": ("down", None)}  # Mixtral's names
ROUTER_NAMES = ("mlp.gate", "block_sparse_moe.gate")


class SparseMoE(nn.Module):
    def __init__(self, c, dtype: torch.dtype):
        super().__init__()
        self.c = c
        e, h, i = c.num_experts, c.hidden_size, c.expert_size
        self.register_buffer("router", torch.empty(e, h, dtype=dtype))
        self.register_buffer("gate_up", torch.empty(e, 2 * i, h, dtype=dtype))  # per expert: gate rows, then up
        self.register_buffer("down", torch.empty(e, h, i, dtype=dtype))
        self.packed_gate_up: list = []
        self.packed_down: list = []

    def checkpoint_tensor(self, module: str) -> torch.Tensor | None:
        """Where checkpoint module `module` ("mlp.experts.3.up_proj", "block_sparse_moe.gate")
        of this layer goes; None if it is not one of this block's."""
        if module in ROUTER_NAMES:
            return self.router
        m = _EXPERT_NAME.fullmatch(module)
        if m is None or m["linear"] not in _EXPERT_LINEARS or int(m["expert"]) >= self.c.num_experts:
            return None
        name, half = _EXPERT_LINEARS[m["linear"]]
        full = getattr(self, name)[int(m["expert"])]
        if half is None:
            return full
        i = self.c.expert_size
        return full[half * i:(half + 1) * i]

    @property
    def num_checkpoint_tensors(self) -> int:
        return 1 + 3 * self.c.num_experts

    def pack(self, int4: bool = False) -> None:
        """Each expert's weights to the dense kernels' layout; the 3-D copies are dropped."""
        self.packed_gate_up = [pack_weight(w, int4) for w in self.gate_up]
        self.packed_down = [pack_weight(w, int4) for w in self.down]
        self.gate_up = self.down = None

    def forward(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        """x [T, hidden] -> the experts' weighted sum [T, hidden]."""
        c = self.c
        probs = torch.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, c.experts_per_token, dim=-1)
        if c.normalize_expert_weights:
            weights /= weights.sum(dim=-1, keepdim=True)
        if not c.expert_weights_in_fp32:  # Qwen3-MoE rounds them to the model's dtype; Mixtral does not
            weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in experts.unique().tolist():  # ascending, as transformers adds them
            tokens, slot = torch.where(experts == expert)
            h = layer_ops.silu_mul(dense_linear(x[tokens], self.packed_gate_up[expert], None), native)
            y = dense_linear(h, self.packed_down[expert], None)
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(x.dtype))
        return out
