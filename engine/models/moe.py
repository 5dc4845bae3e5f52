"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): each token's router picks its top-k of
E SiLU-gated experts, whose outputs are summed with the router's weights.

Computed as transformers computes it, so bf16 rounds at the same points: router logits in the
model's dtype, softmax in fp32, top-k (renormalised to sum to 1 where the model does), then
expert by expert in ascending order each one's tokens through gate/up, SiLU and down, scaled
by their weight and added into the output. Only the experts some token picked run, each on
just its tokens, through the same packed GEMMs as the dense projections.

Adapters may adapt the experts and the router as peft does through target_parameters
(transformers 5 keeps each layer's experts as stacked 3-D parameters): each expert has its own
A/B pair, added to its gate/up or down output for the tokens routed to it, per token's adapter;
the router's pair is added to the router logits before the top-k. The step's shapes depend on
the routing, so these models run without CUDA graphs.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from loragate.kernels import layer_ops
from loragate.kernels import native as _native
from loragate.kernels.dense import dense_linear, pack_weight
from loragate.kernels.lora import SHORT_SEGMENT, LoraModule, LoraModules

# Checkpoint names of the router and of expert e's linears, as the models are published (and
# as transformers 5 saves them): module -> (this block's tensor, row half of gate_up or None).
_EXPERT_NAME = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<linear>\w+)")
_EXPERT_LINEARS = {"gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", None),
                   "w1": ("gate_up", 0), "w3": ("gate_up", 1), "w2": ("down", None)}  # Mixtral's names
ROUTER_NAMES = ("mlp.gate", "block_sparse_moe.gate")


# An expert's rows from which the AMX LoRA kernel beats the AVX-512 one: for a rank-32 gate/up
# of Qwen3-30B-A3B's shape they took 23 vs 10 us at 1 row and 15 vs 55 us at 16 (ad hoc timing).
AMX_ROWS = 4


class Runs:
    """An expert's rows in runs of one adapter: (first row, rows, slot) each, and the same as
    the native kernels' index tensors, made once for the expert's two projections."""

    def __init__(self, runs: list[tuple[int, int, int]]):
        self.runs, self._index = runs, None

    def index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._index is None:
            self._index = tuple(torch.tensor(self.runs, dtype=torch.int64).T.contiguous())
        return self._index


class ExpertLora:
    """The step's adapters on one MoE block: for a row with slot s, y += (x @ A.T) @ B.T with
    expert e's A [R, in] and B [out, R] from the pool's stacks ([slots, experts, R, in] and
    [slots, experts, out, R]). An expert's rows come in runs of one adapter (a request's
    tokens are contiguous; a step of one adapter is one run). The native LoRA kernels take all
    of one expert's runs in one call: the AMX one (bf16) where the expert has AMX_ROWS rows or
    more (below, its tile set-up costs more than it saves), else the AVX-512 one, which takes
    runs of up to SHORT_SEGMENT rows; torch takes the rest, and everything on a GPU or without
    the native kernels."""

    def __init__(self, lora, targeted: set[str], moe: "SparseMoE", device: torch.device, native: bool):
        self.rank, self.pool, self.moe = lora.rank, lora.pool, moe
        self.token_slots = lora.plan.on(device).token_slots
        self.stacks = {name: (lora.pool.a[name][moe.layer_index], lora.pool.b[name][moe.layer_index])
                       for name in targeted}
        self.native = native and device.type == "cpu" and self.rank <= _native.MAX_LORA_RANK
        # Whether every row of the step has one adapter (one request, or one tenant's): then every
        # expert's rows are one run, with no need to look at them.
        slots = lora.plan.slot_ids
        self.single = int(slots[0]) if slots.numel() == 1 and int(slots[0]) >= 0 else None
        self.num_rows = int(lora.plan.seg_indptr[-1])

    @classmethod
    def of(cls, batch, moe: "SparseMoE", device: torch.device) -> "ExpertLora | None":
        """None unless an adapter of the step adapts a parameter of the block (arch.lora_parameters)."""
        lora = None if batch is None else batch.lora
        targeted = set() if lora is None or lora.plan is None else lora.modules & moe.c.lora_parameters.keys()
        return cls(lora, targeted, moe, device, batch.use_native_kernels) if targeted else None

    def runs(self, rows: torch.Tensor | None) -> Runs:
        """The runs of rows with an adapter among the step's rows `rows` (ascending; None: all
        of them)."""
        if self.single is not None:
            return Runs([(0, self.num_rows if rows is None else rows.shape[0], self.single)])
        slots, counts = torch.unique_consecutive(self.token_slots if rows is None else self.token_slots[rows],
                                                 return_counts=True)
        out, start = [], 0
        for slot, n in zip(slots.tolist(), counts.tolist()):
            if slot >= 0:
                out.append((start, n, slot))
            start += n
        return Runs(out)

    def add(self, y: torch.Tensor, x: torch.Tensor, name: str, expert: int, runs: Runs) -> None:
        """y [n, out] += the LoRA of `name`'s matrix `expert` on x [n, in], per run of rows."""
        if name not in self.stacks or not runs.runs:
            return
        a, b = self.stacks[name]
        r, short = self.rank, []
        mods = self.moe.lora_modules(self.pool, name, expert) if self.native else None
        native = (mods is not None and mods.native_ok and x.dtype == y.dtype == mods.dtype and x.stride(1) == 1
                  and y.stride(1) == 1)
        if native and mods.amx and x.shape[0] >= AMX_ROWS:
            _native.lora_add(y, x, mods.table, r, *runs.index(), amx=True)
            return
        for start, n, slot in runs.runs:
            if native and n <= SHORT_SEGMENT:
                short.append((start, n, slot))
            else:
                rows = slice(start, start + n)
                y[rows] += (x[rows] @ a[slot, expert, :r].T) @ b[slot, expert, :, :r].T
        if len(short) == len(runs.runs):
            _native.lora_add(y, x, mods.table, r, *runs.index(), amx=False)
        elif short:
            _native.lora_add(y, x, mods.table, r, *Runs(short).index(), amx=False)


class SparseMoE(nn.Module):
    def __init__(self, c, dtype: torch.dtype, layer_index: int = 0):
        super().__init__()
        self.c = c
        self.layer_index = layer_index
        self._lora_pool = None  # the pool _lora_modules was built for
        self._lora_modules: dict[tuple[str, int], LoraModules] = {}
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

    def lora_modules(self, pool, name: str, expert: int) -> LoraModules:
        """Expert `expert`'s slice of parameter `name`'s stacks, for the native LoRA kernel:
        made on first use and kept (the stacks never move)."""
        if pool is not self._lora_pool:
            self._lora_pool, self._lora_modules = pool, {}
        mods = self._lora_modules.get((name, expert))
        if mods is None:
            a, b = pool.a[name][self.layer_index], pool.b[name][self.layer_index]
            mods = self._lora_modules[(name, expert)] = LoraModules([LoraModule(0, a[:, expert], b[:, expert])])
        return mods

    def forward(self, x: torch.Tensor, batch, native: bool) -> torch.Tensor:
        """x [T, hidden] -> the experts' weighted sum [T, hidden]."""
        c = self.c
        lora = ExpertLora.of(batch, self, x.device)
        logits = F.linear(x, self.router)
        if lora is not None:
            lora.add(logits, x, "gate.weight", 0, lora.runs(None))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, c.experts_per_token, dim=-1)
        if c.normalize_expert_weights:
            weights /= weights.sum(dim=-1, keepdim=True)
        if not c.expert_weights_in_fp32:  # Qwen3-MoE rounds them to the model's dtype; Mixtral does not
            weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in experts.unique().tolist():  # ascending, as transformers adds them
            tokens, slot = torch.where(experts == expert)
            xe = x[tokens]
            runs = None if lora is None else lora.runs(tokens)
            gate_up = dense_linear(xe, self.packed_gate_up[expert], None)
            if runs is not None:
                lora.add(gate_up, xe, "experts.gate_up_proj", expert, runs)
            h = layer_ops.silu_mul(gate_up, native)
            y = dense_linear(h, self.packed_down[expert], None)
            if runs is not None:
                lora.add(y, h, "experts.down_proj", expert, runs)
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(x.dtype))
        return out
