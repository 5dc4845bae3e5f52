"""LoRA over segments of a packed token batch: y += (x @ A[slot].T) @ B[slot].T per segment.

Tokens of the same adapter are contiguous: segment i covers rows seg_indptr[i] ..
seg_indptr[i+1] and uses pool slot slot_ids[i]; slot -1 means the base model (no LoRA).
Adapters live stacked and rank-padded in the pool: a_stack [num_slots, R, in] and
b_stack [num_slots, out, R], the scaling already folded into B, zero beyond each adapter's rank.

`lora_shrink` / `lora_expand` are the plain torch reference (a loop over segments). The fast
path, `add_lora_modules` with a `LoraPlan`, runs every short segment (decode, speculative
verification) of a step, for all of a projection's modules, in one native call (or, without
the native kernels, one gathered batched matmul pair per module), and long segments (prefill
chunks) one matmul pair each, where the per-call cost is amortised over many rows (the AMX
kernel takes those too: no per-step oneDNN shapes). On CUDA, flashinfer's segment GEMM takes
every segment (kernels/lora_cuda.py, imported lazily).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import lora_cuda as _lora_cuda
from . import native as _native

SHORT_SEGMENT = 64  # segments up to this many rows go through the batched path


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg_indptr: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Semantics: out[t] = x[t] @ a_stack[slot(t)].T, zero for base rows. x [T, in] -> [T, R]."""
    out = torch.zeros(x.shape[0], a_stack.shape[1], dtype=x.dtype)
    for i, slot in enumerate(slot_ids.tolist()):
        s, e = int(seg_indptr[i]), int(seg_indptr[i + 1])
        if slot >= 0 and e > s:
            out[s:e] = x[s:e] @ a_stack[slot].T
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, seg_indptr: torch.Tensor,
                slot_ids: torch.Tensor) -> torch.Tensor:
    """Semantics: y[t] += h[t] @ b_stack[slot(t)].T for LoRA rows (in place; returns y).
    h [T, R], y [T, out]."""
    for i, slot in enumerate(slot_ids.tolist()):
        s, e = int(seg_indptr[i]), int(seg_indptr[i + 1])
        if slot >= 0 and e > s:
            y[s:e] += h[s:e] @ b_stack[slot].T
    return y


@dataclass
class LoraPlan:
    """Index tensors for one step's segments, built once and shared by every layer."""

    seg_indptr: torch.Tensor  # [num_segments + 1] int64
    slot_ids: torch.Tensor  # [num_segments] int64, -1 = base model
    short_slots: torch.Tensor  # [S] slots of the short LoRA segments
    short_rows: torch.Tensor  # [n] batch rows of those segments' tokens
    short_seg: torch.Tensor  # [n] which short segment each of those rows belongs to
    short_pos: torch.Tensor  # [n] its position inside the segment
    short_len: int  # longest short segment
    short_start: torch.Tensor  # [S] first batch row of each short segment
    short_count: torch.Tensor  # [S] rows of each short segment
    long_segments: list[tuple[int, int, int]]  # (start, end, slot) of long LoRA segments
    lora_start: torch.Tensor  # [L] every LoRA segment, short or long: first batch row
    lora_count: torch.Tensor  # [L] its rows
    lora_slots: torch.Tensor  # [L] its slot
    token_slots: torch.Tensor | None = None  # [T] each row's slot, -1 = base model (a MoE block's experts)
    # Row terms (DoRA, lora_bias: engine/models/slot_rows.py): per LoRA segment and per short
    # one, the row of the projection's term tables (its slot), -1 for none; and whether a long
    # segment has them (the non-AMX kernel leaves long segments to torch, terms and all).
    lora_term_row: torch.Tensor | None = None
    short_term_row: torch.Tensor | None = None
    long_terms: bool = False
    # What a device's kernels made of this plan (its tensors copied there): a plan is built on
    # the host once per step and used by every projection of every layer.
    device_copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def to(self, device: torch.device) -> LoraPlan:
        """The plan with its index tensors on `device` (the torch path indexes GPU tensors)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def on(self, device: torch.device) -> LoraPlan:
        """to(device), made once per plan and device."""
        if device.type == "cpu":
            return self
        if device not in self.device_copies:
            self.device_copies[device] = self.to(device)
        return self.device_copies[device]

    @property
    def has_lora(self) -> bool:
        return bool(self.long_segments) or self.short_rows.numel() > 0


def plan_segments(seg_indptr: list[int], slot_ids: list[int], term_slots=frozenset()) -> LoraPlan:
    """term_slots: the slots whose adapters add row terms."""
    short_slots, rows, seg, pos, longs, starts, counts = [], [], [], [], [], [], []
    short_len = 0
    for i, slot in enumerate(slot_ids):
        s, e = seg_indptr[i], seg_indptr[i + 1]
        if slot < 0 or e == s:
            continue
        if e - s > SHORT_SEGMENT:
            longs.append((s, e, slot))
            continue
        k = len(short_slots)
        short_slots.append(slot)
        starts.append(s)
        counts.append(e - s)
        rows.extend(range(s, e))
        seg.extend([k] * (e - s))
        pos.extend(range(e - s))
        short_len = max(short_len, e - s)
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    lora = [(seg_indptr[i], seg_indptr[i + 1] - seg_indptr[i], slot) for i, slot in enumerate(slot_ids)
            if slot >= 0 and seg_indptr[i + 1] > seg_indptr[i]]
    plan = LoraPlan(t(seg_indptr), t(slot_ids), t(short_slots), t(rows), t(seg), t(pos), short_len, t(starts),
                    t(counts), longs, *(t([seg[k] for seg in lora]) for k in range(3)),
                    torch.repeat_interleave(t(slot_ids), t(seg_indptr).diff()))
    if term_slots:
        plan.lora_term_row = t([s if s in term_slots else -1 for _, _, s in lora])
        plan.short_term_row = t([s if s in term_slots else -1 for s in short_slots])
        plan.long_terms = any(s in term_slots for _, _, s in longs)
    return plan


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-targeted module of a projection: its first column in the output and its
    pool stacks a [slots, R, in], b [slots, out, R]."""

    column: int
    a: torch.Tensor
    b: torch.Tensor

    @property
    def width(self) -> int:
        return self.b.shape[1]


class LoraModules:
    """The targeted modules of one projection (q, k and v of a fused qkv share their input),
    with the table that lets one native call do all of them. Built once per projection and
    pool: the table holds the stacks' addresses, which never move."""

    def __init__(self, modules: list[LoraModule]):
        self.modules = modules
        a = modules[0].a if modules else None
        self.dtype = a.dtype if a is not None else None
        # checked once here rather than on every call: the stacks never change shape or place
        self.native_ok = a is not None and _native.usable(a) and a.shape[2] <= _native.MAX_LORA_IN and all(
            _native.usable(m.a, m.b) and m.a.stride(1) == m.a.shape[2] and m.a.dtype == m.b.dtype == a.dtype
            and m.a.shape[2] == a.shape[2] for m in modules)
        # Whether the AMX kernel (csrc/lora_amx.c) runs these modules. It also takes long segments
        # (prefill chunks), which would otherwise be two torch matmuls per module whose shapes
        # change every step. Tests turn it off to run the other kernel on the same shapes.
        self.amx = self.native_ok and self.dtype == torch.bfloat16 and _native.amx_available() and (
            a.shape[2] % 32 == 0 and a.shape[1] % 16 == 0 and all(
                m.a.stride(0) >= a.shape[1] * a.shape[2] and m.b.stride(1) == a.shape[1] for m in modules))
        self.table = torch.tensor([[m.column, m.width, m.a.data_ptr(), m.a.stride(0), m.b.data_ptr(), m.b.stride(0),
                                    m.b.stride(1)] for m in modules], dtype=torch.int64)


def add_lora_modules(y: torch.Tensor, x: torch.Tensor, mods: LoraModules, plan: LoraPlan, rank: int,
                     native: bool = True, row_scale: torch.Tensor | None = None,
                     row_shift: torch.Tensor | None = None) -> bool:
    """y[:, m.column:m.column + m.width] += LoRA of module m, for every module, in place (the
    semantics of lora_expand(lora_shrink(...)) per module). Only the first `rank` rank positions
    are used: the step's largest rank. On CPU with the native kernels built, the short
    segments of all modules take one native call (csrc/lora.c), with the long ones too on AMX;
    on CUDA, flashinfer's segment GEMM does all segments (kernels/lora_cuda.py).

    row_scale / row_shift: the projection's per-slot row terms [slots + 1, y's width] (see
    engine/models/slot_rows.py). The native kernels apply them as they add (y = y * s + t on the
    rows of plan's segments with terms) where they take every such segment; returns whether
    they did, else the caller applies them."""
    terms = plan.lora_term_row is not None and (row_scale is not None or row_shift is not None)
    if x.device.type == "cuda":
        if native and _lora_cuda.usable(x, mods):
            _lora_cuda.add_lora_modules(y, x, mods, plan)
            return False
        plan = plan.on(x.device)  # the torch path below, with its index tensors on the GPU
    native = (native and mods.native_ok and x.dtype == y.dtype == mods.dtype and x.stride(1) == 1
              and y.stride(1) == 1 and rank <= _native.MAX_LORA_RANK and x.device.type == "cpu"
              and all(t is None or (t.dtype == y.dtype and t.stride(1) == 1) for t in (row_scale, row_shift)))
    if native and mods.amx:
        if plan.lora_slots.numel():
            _native.lora_add(y, x, mods.table, rank, plan.lora_start, plan.lora_count, plan.lora_slots, amx=True,
                             row_scale=row_scale if terms else None, row_shift=row_shift if terms else None,
                             seg_term_row=plan.lora_term_row if terms else None)
        return terms
    for s, e, slot in plan.long_segments:
        for m in mods.modules:
            y[s:e, m.column:m.column + m.width] += (x[s:e] @ m.a[slot, :rank].T) @ m.b[slot, :, :rank].T
    if plan.short_rows.numel() == 0:
        return False
    if native:
        fold = terms and not plan.long_terms
        _native.lora_add(y, x, mods.table, rank, plan.short_start, plan.short_count, plan.short_slots, amx=False,
                         row_scale=row_scale if fold else None, row_shift=row_shift if fold else None,
                         seg_term_row=plan.short_term_row if fold else None)
        return fold
    num = plan.short_slots.shape[0]
    xp = x.new_zeros(num, plan.short_len, x.shape[1])
    xp[plan.short_seg, plan.short_pos] = x.index_select(0, plan.short_rows)
    for m in mods.modules:
        a, b = m.a[:, :rank].index_select(0, plan.short_slots), m.b[:, :, :rank].index_select(0, plan.short_slots)
        d = torch.bmm(torch.bmm(xp, a.transpose(1, 2)), b.transpose(1, 2))  # [S, L, out]
        y[:, m.column:m.column + m.width].index_add_(0, plan.short_rows, d[plan.short_seg, plan.short_pos])
    return False


def add_lora_rows(y: torch.Tensor, x: torch.Tensor, mods: LoraModules, row_slots: torch.Tensor, rank: int) -> None:
    """add_lora_modules for a batch where row t uses slot row_slots[t] (-1: none), with no
    segments: each row gathers its adapter's weights and takes two batched products. Nothing is
    read back to the host and every shape follows x's, so a CUDA graph can capture it
    (engine/cuda_graphs.py); it suits decode-sized batches, not prefill (weights per row)."""
    use = (row_slots >= 0).to(x.dtype)[:, None]
    slots = row_slots.clamp(min=0)
    for m in mods.modules:
        a = m.a[:, :rank].index_select(0, slots)  # [T, rank, in]
        b = m.b[:, :, :rank].index_select(0, slots)  # [T, out, rank]
        h = torch.bmm(a, x.unsqueeze(2))  # lora_A's output in the weights' dtype, as in PEFT
        y[:, m.column:m.column + m.width] += torch.bmm(b, h).squeeze(2) * use


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, plan: LoraPlan,
             rank: int | None = None, native: bool = True) -> None:
    """y += lora_expand(lora_shrink(x, a_stack, ...), b_stack, ...) for one module, fast path."""
    rank = a_stack.shape[1] if rank is None else rank
    add_lora_modules(y, x, LoraModules([LoraModule(0, a_stack, b_stack)]), plan, rank, native)
