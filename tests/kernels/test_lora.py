"""Segmented LoRA: the fast CPU path (add_lora with a LoraPlan) against the torch reference
(lora_shrink + lora_expand) and a float64 per-row computation."""

from __future__ import annotations

import random

import pytest
import torch

from loragate.kernels import native as _native
from loragate.kernels.lora import (SHORT_SEGMENT, LoraModule, LoraModules, add_lora, add_lora_modules, add_lora_rows,
                                   lora_expand, lora_shrink, plan_segments)

NUM_SLOTS = 8
IN, OUT = 48, 40


def zipf_slots(n, rng):
    weights = [1 / (k + 1) for k in range(NUM_SLOTS)]
    return rng.choices(range(NUM_SLOTS), weights=weights, k=n)


PATTERNS = {
    "all-distinct": lambda n, rng: [i % NUM_SLOTS for i in range(n)],
    "all-same": lambda n, rng: [3] * n,
    "zipf": zipf_slots,
    "with-base-rows": lambda n, rng: [rng.choice([-1, -1, 0, 5]) for _ in range(n)],
}


def make_case(batch, rank, pattern, dtype, seed, long_every=0):
    """`batch` requests, each 1 token (decode) or, every `long_every`-th, a long prefill chunk.
    Requests are grouped by slot like the engine does; returns x, stacks and segments."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    slots = sorted(PATTERNS[pattern](batch, rng))
    lengths = [SHORT_SEGMENT + 9 if long_every and i % long_every == 0 else rng.randint(1, 4) for i in range(batch)]
    indptr, seg_slots = [0], []
    for slot, n in zip(slots, lengths):  # merge consecutive equal slots into one segment
        if seg_slots and seg_slots[-1] == slot:
            indptr[-1] += n
        else:
            seg_slots.append(slot)
            indptr.append(indptr[-1] + n)
    T = indptr[-1]
    x = torch.randn(T, IN, generator=g).to(dtype)
    a = torch.zeros(NUM_SLOTS, 64, IN, dtype=dtype)
    b = torch.zeros(NUM_SLOTS, OUT, 64, dtype=dtype)
    a[:, :rank] = (torch.randn(NUM_SLOTS, rank, IN, generator=g) * 0.2).to(dtype)
    b[:, :, :rank] = (torch.randn(NUM_SLOTS, OUT, rank, generator=g) * 0.2).to(dtype)
    return x, a, b, indptr, seg_slots


def naive(x, a, b, indptr, seg_slots):
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for i, slot in enumerate(seg_slots):
        for t in range(indptr[i], indptr[i + 1]):
            if slot >= 0:
                y[t] = (x[t].double() @ a[slot].double().T) @ b[slot].double().T
    return y


CASES = [(batch, rank, pattern, dtype, long_every)
         for batch in (1, 2, 3, 7, 16, 33)
         for rank in (4, 8, 16, 64)
         for pattern in PATTERNS
         for dtype in (torch.float32, torch.bfloat16)
         for long_every in (0, 5)
         if (batch + rank + len(pattern)) % 3 == 0 or batch in (1, 33)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("batch, rank, pattern, dtype, long_every", CASES)
def test_fast_path_matches_reference_and_float64(batch, rank, pattern, dtype, long_every, native):
    x, a, b, indptr, seg_slots = make_case(batch, rank, pattern, dtype, seed=batch * 100 + rank, long_every=long_every)
    ip, ss = torch.tensor(indptr), torch.tensor(seg_slots)
    ref = lora_expand(torch.zeros(x.shape[0], OUT, dtype=dtype), lora_shrink(x, a, ip, ss), b, ip, ss)
    fast = torch.zeros(x.shape[0], OUT, dtype=dtype)
    if native:
        assert _native.library() is not None
    add_lora(fast, x, a, b, plan_segments(indptr, seg_slots), rank=rank, native=native)
    want = naive(x, a, b, indptr, seg_slots)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ref.double(), want, **tol)
    torch.testing.assert_close(fast.double(), want, **tol)
    base_rows = [t for i, s in enumerate(seg_slots) if s < 0 for t in range(indptr[i], indptr[i + 1])]
    assert torch.all(fast[base_rows] == 0)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_add_lora_adds_to_existing_output_of_a_column_slice(native):
    """The engine applies LoRA to one module's columns of a fused projection output."""
    x, a, b, indptr, seg_slots = make_case(7, 8, "zipf", torch.float32, seed=1, long_every=3)
    y = torch.randn(x.shape[0], OUT + 10)
    before = y.clone()
    add_lora(y[:, 5:5 + OUT], x, a, b, plan_segments(indptr, seg_slots), rank=8, native=native)
    torch.testing.assert_close(y[:, 5:5 + OUT].double(), before[:, 5:5 + OUT].double() + naive(x, a, b, indptr, seg_slots),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(y[:, :5], before[:, :5]) and torch.equal(y[:, 5 + OUT:], before[:, 5 + OUT:])


def test_plan_of_a_base_only_batch_has_no_lora():
    plan = plan_segments([0, 4, 9], [-1, -1])
    assert not plan.has_lora


# A projection's modules (q, k, v of a fused qkv) in one call. Input widths that are multiples of
# 32 and pools whose rank is a multiple of 16 take the AMX kernel where the CPU has it (the
# other shapes, and "native-no-amx", the AVX-512 / plain kernel); segments of 1..64 rows cover partial and several
# 16-token blocks, odd ranks the pool's zero padding, ranks above 32 several rank chunks.
GROUP_CASES = [
    # in, module widths, pool rank, step rank, segment lengths (slot -1 every third segment)
    (64, [40, 16, 24], 16, 16, [1, 2, 3, 4]),
    (64, [40, 16, 24], 64, 15, [16, 17, 5]),
    (96, [33], 64, 64, [64, 1, 31]),
    (64, [48, 8], 32, 20, [9, 40, 2, 2, 2]),
    (128, [16], 16, 4, [33]),
    (48, [40, 24], 16, 8, [3, 20]),  # input width not a multiple of 32
    (64, [24, 24], 8, 8, [7, 7, 7]),  # pool rank below one tile
]


def make_group(in_features, widths, pool_rank, rank, lengths, dtype, g):
    """A projection's modules (their columns start inside y, not at 0) with random stacks, and
    segments of the given lengths (slot -1 every third). Returns modules, the column after the
    last module, indptr and the segments' slots."""
    modules, column = [], 3
    for width in widths:
        a = torch.zeros(NUM_SLOTS, pool_rank, in_features, dtype=dtype)
        b = torch.zeros(NUM_SLOTS, width, pool_rank, dtype=dtype)
        a[:, :rank] = (torch.randn(NUM_SLOTS, rank, in_features, generator=g) * 0.2).to(dtype)
        b[:, :, :rank] = (torch.randn(NUM_SLOTS, width, rank, generator=g) * 0.2).to(dtype)
        modules.append(LoraModule(column, a, b))
        column += width
    indptr, seg_slots = [0], []
    for i, n in enumerate(lengths):
        seg_slots.append(-1 if i % 3 == 2 else (5 * i + 1) % NUM_SLOTS)
        indptr.append(indptr[-1] + n)
    return modules, column, indptr, seg_slots


@pytest.mark.parametrize("path", ["native", "native-no-amx", "torch", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("in_features, widths, pool_rank, rank, lengths", GROUP_CASES)
def test_modules_of_a_projection_in_one_call_match_float64(in_features, widths, pool_rank, rank, lengths, dtype, path):
    g = torch.Generator().manual_seed(in_features + pool_rank + rank)
    modules, column, indptr, seg_slots = make_group(in_features, widths, pool_rank, rank, lengths, dtype, g)
    x = torch.randn(indptr[-1], in_features, generator=g).to(dtype)
    y = torch.randn(indptr[-1], column + 5, generator=g).to(dtype)
    before = y.clone()
    mods = LoraModules(modules)
    if path == "native-no-amx":  # the AVX-512 / plain kernel on the shapes AMX would take
        mods.amx = False
    if path == "rows":  # per-row slots, no segments: a captured decode step's form (engine/cuda_graphs.py)
        row_slots = torch.tensor([s for i, s in enumerate(seg_slots) for _ in range(indptr[i + 1] - indptr[i])])
        add_lora_rows(y, x, mods, row_slots, rank)
    else:
        add_lora_modules(y, x, mods, plan_segments(indptr, seg_slots), rank, native=path != "torch")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    for m in modules:
        want = before[:, m.column:m.column + m.width].double() + naive(x, m.a[:, :rank], m.b[:, :, :rank], indptr,
                                                                        seg_slots)
        torch.testing.assert_close(y[:, m.column:m.column + m.width].double(), want, **tol)
    assert torch.equal(y[:, :3], before[:, :3]) and torch.equal(y[:, column:], before[:, column:])


@pytest.mark.parametrize("terms", ["scale", "shift", "both"])
@pytest.mark.parametrize("path", ["native", "native-no-amx", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("in_features, widths, pool_rank, rank, lengths", GROUP_CASES[:4] + GROUP_CASES[5:6])
def test_row_terms_are_applied_once_whichever_path_adds_the_lora(in_features, widths, pool_rank, rank, lengths, dtype,
                                                                  path, terms):
    """DoRA / lora_bias segments end as (y + lora) * s + t on the projection's LoRA columns. The
    native kernels fold that into their add where they take every such segment (AMX: all;
    the AVX-512 / plain kernel: short ones, unless a long segment has terms); otherwise
    add_lora_modules says so and the caller applies them, as Projection.forward does."""
    g = torch.Generator().manual_seed(in_features + rank + 7)
    modules, column, indptr, seg_slots = make_group(in_features, widths, pool_rank, rank, lengths, dtype, g)
    term_slots = frozenset(s for i, s in enumerate(seg_slots) if s >= 0 and i % 2 == 0)
    width = column + 5
    # outside the LoRA columns a table is the identity (engine/models/slot_rows.py keeps it so)
    scale, shift = torch.ones(NUM_SLOTS + 1, width), torch.zeros(NUM_SLOTS + 1, width)
    scale[:, 3:column] = torch.rand(NUM_SLOTS + 1, column - 3, generator=g) + 0.5
    shift[:, 3:column] = torch.randn(NUM_SLOTS + 1, column - 3, generator=g)
    scale, shift = scale.to(dtype), shift.to(dtype)
    row_scale = scale if terms in ("scale", "both") else None
    row_shift = shift if terms in ("shift", "both") else None
    x = torch.randn(indptr[-1], in_features, generator=g).to(dtype)
    y = torch.randn(indptr[-1], width, generator=g).to(dtype)
    before = y.clone()
    mods = LoraModules(modules)
    if path == "native-no-amx":
        mods.amx = False
    folded = add_lora_modules(y, x, mods, plan_segments(indptr, seg_slots, term_slots), rank, path != "torch",
                              row_scale, row_shift)
    if not folded:  # what the caller does then
        for i, slot in enumerate(seg_slots):
            if slot in term_slots:
                rows = y[indptr[i]:indptr[i + 1]]
                if row_scale is not None:
                    rows.mul_(row_scale[slot])
                if row_shift is not None:
                    rows.add_(row_shift[slot])
    if path != "torch" and mods.native_ok:
        assert folded  # every segment is short, or AMX takes them all
    if path == "torch":
        assert not folded
    want = before.double()
    for m in modules:
        want[:, m.column:m.column + m.width] += naive(x, m.a[:, :rank], m.b[:, :, :rank], indptr, seg_slots)
    for i, slot in enumerate(seg_slots):
        if slot in term_slots:
            rows = slice(indptr[i], indptr[i + 1])
            want[rows] = want[rows] * (scale[slot].double() if row_scale is not None else 1)
            want[rows] += shift[slot].double() if row_shift is not None else 0
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-2, rtol=4e-2)
    torch.testing.assert_close(y.double(), want, **tol)


@pytest.mark.parametrize("path", ["native", "native-no-amx", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_experts_slice_of_stacked_slots_matches_float64(dtype, path):
    """A MoE block's expert (engine/models/moe.py): its A and B are views of stacks
    [slots, experts, R, in] and [slots, experts, out, R], so its slots lie further apart than
    their rank rows; the AMX kernel takes them too."""
    g = torch.Generator().manual_seed(11)
    experts, expert, pool_rank, rank, in_features, out = 3, 1, 32, 20, 64, 40
    a = torch.zeros(NUM_SLOTS, experts, pool_rank, in_features, dtype=dtype)
    b = torch.zeros(NUM_SLOTS, experts, out, pool_rank, dtype=dtype)
    a[..., :rank, :] = (torch.randn(NUM_SLOTS, experts, rank, in_features, generator=g) * 0.2).to(dtype)
    b[..., :rank] = (torch.randn(NUM_SLOTS, experts, out, rank, generator=g) * 0.2).to(dtype)
    mods = LoraModules([LoraModule(0, a[:, expert], b[:, expert])])
    assert mods.amx == (dtype == torch.bfloat16 and _native.amx_available())
    if path == "native-no-amx":
        mods.amx = False
    indptr, seg_slots = [0, 16, 33, 38, 41], [1, 3, -1, 0]
    x = torch.randn(indptr[-1], in_features, generator=g).to(dtype)
    y = torch.randn(indptr[-1], out, generator=g).to(dtype)
    want = y.double() + naive(x, a[:, expert, :rank], b[:, expert, :, :rank], indptr, seg_slots)
    add_lora_modules(y, x, mods, plan_segments(indptr, seg_slots), rank, native=path != "torch")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(y.double(), want, **tol)


@pytest.mark.parametrize("dtype, pool_rank, in_features", [(torch.float32, 16, 64), (torch.bfloat16, 8, 64),
                                                            (torch.bfloat16, 16, 48)])
def test_amx_kernel_refuses_what_it_cannot_run(dtype, pool_rank, in_features):
    """fp32, a pool rank below a tile, an input width not in 32-wide blocks: an error, never a
    misread (the Python side does not send these; the C side checks anyway)."""
    assert _native.library() is not None
    mods = LoraModules([LoraModule(0, torch.zeros(2, pool_rank, in_features, dtype=dtype),
                                   torch.zeros(2, 8, pool_rank, dtype=dtype))])
    assert not mods.amx
    plan = plan_segments([0, 3], [1])
    y = torch.zeros(3, 8, dtype=dtype)
    with pytest.raises(RuntimeError, match="refused"):
        _native.lora_add(y, torch.ones(3, in_features, dtype=dtype), mods.table, pool_rank, plan.lora_start,
                         plan.lora_count, plan.lora_slots, amx=True)
    assert torch.equal(y, torch.zeros(3, 8, dtype=dtype))
