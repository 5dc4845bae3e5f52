"""LoRA over segments of a packed token batch: y += (x @ A[slot].T) @ B[slot].T per segment.

Tokens of the same adapter are contiguous: segment i covers rows seg_indptr[i] ..
seg_indptr[i+1] and uses pool slot slot_ids[i]; slot -1 means the base model (no LoRA).
Adapters live stacked and rank-padded in the pool: a_stack [num_slots, R, in] and
b_stack [num_slots, out, R], the scaling already folded into B, zero beyond each adapter's rank.

`lora_shrink` / `lora_expand` are the plain torch reference (a loop over segments). The CPU
fast path, `add_lora` with a `LoraPlan`, runs every short segment (decode, speculative
verification) of a step in one gathered batched matmul pair, and long segments (prefill
chunks) one matmul pair each, where the per-call cost is amortised over many rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def has_lora(self) -> bool:
        return bool(self.long_segments) or self.short_rows.numel() > 0


def plan_segments(seg_indptr: list[int], slot_ids: list[int]) -> LoraPlan:
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
    return LoraPlan(t(seg_indptr), t(slot_ids), t(short_slots), t(rows), t(seg), t(pos), short_len, t(starts),
                    t(counts), longs)


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, plan: LoraPlan,
             rank: int | None = None, native: bool = True) -> None:
    """Fast path of y += lora_expand(lora_shrink(x, ...), ...) (same semantics), in place.
    Only the first `rank` rank positions are used (default: all): the step's largest rank.
    On CPU with the native kernels built, one native call per module (csrc/lora.c)."""
    rank = a_stack.shape[1] if rank is None else rank
    a_stack, b_stack = a_stack[:, :rank], b_stack[:, :, :rank]
    for s, e, slot in plan.long_segments:
        y[s:e] += (x[s:e] @ a_stack[slot].T) @ b_stack[slot].T
    if plan.short_rows.numel() == 0:
        return
    if (native and x.is_contiguous() and a_stack.stride(2) == 1 and b_stack.stride(2) == 1
            and _native.usable(x, y, a_stack) and x.shape[1] <= _native.MAX_LORA_IN and rank <= _native.MAX_LORA_RANK):
        _native.lora_add(y, x, a_stack, b_stack, rank, plan.short_start, plan.short_count, plan.short_slots)
        return
    num = plan.short_slots.shape[0]
    xp = x.new_zeros(num, plan.short_len, x.shape[1])
    xp[plan.short_seg, plan.short_pos] = x.index_select(0, plan.short_rows)
    h = torch.bmm(xp, a_stack.index_select(0, plan.short_slots).transpose(1, 2))  # [S, L, R]
    d = torch.bmm(h, b_stack.index_select(0, plan.short_slots).transpose(1, 2))  # [S, L, out]
    y.index_add_(0, plan.short_rows, d[plan.short_seg, plan.short_pos])
