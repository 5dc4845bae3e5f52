"""The CUDA path of the segmented LoRA: flashinfer's segment GEMM (CUTLASS grouped GEMM),
one shrink and one expand per module over all of a step's LoRA segments, each segment with
its own adapter's weights (`weight_indices` = the segments' pool slots).

flashinfer is imported here only, on first use, so CPU installs never need it (the `cuda`
extra installs it). Without it, CUDA tensors take the torch path of kernels/lora.py. So they
do where flashinfer cannot build the kernel: it compiles it on first use on a machine (JIT,
cached under ~/.cache/flashinfer), which needs nvcc and a GPU its kernels support.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch

# flashinfer's recommended float workspace for the CUTLASS segment GEMM kernels.
WORKSPACE_BYTES = 128 << 20
DTYPES = (torch.float16, torch.bfloat16)

log = logging.getLogger("loragate.kernels")


@functools.cache
def _flashinfer():
    try:
        import flashinfer
    except (ImportError, OSError, RuntimeError):  # not installed, or installed without a usable CUDA
        return None
    return flashinfer


def usable(x: torch.Tensor, mods) -> bool:
    """CUDA tensors of a dtype the kernels take, stacks laid out as the kernel reads them
    (contiguous: slot s's [d_out, d_in] matrix at s * d_out * d_in), flashinfer installed and
    its kernel built."""
    return (x.device.type == "cuda" and x.dtype in DTYPES and bool(mods.modules) and _flashinfer() is not None
            and all(m.a.is_contiguous() and m.b.is_contiguous() and m.a.dtype == m.b.dtype == x.dtype
                    and m.a.device == m.b.device == x.device for m in mods.modules)
            and _runs_on(x.device, x.dtype))


@functools.cache
def _runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the segment GEMM runs here: one tiny product, which also makes flashinfer
    compile it. If that fails, LoRA takes the torch path, with one warning."""
    x = torch.zeros(2, 64, dtype=dtype, device=device)
    weights = torch.zeros(1, 16, 64, dtype=dtype, device=device)
    indptr = torch.tensor([0, 2], dtype=torch.int64, device=device)
    try:
        _segment_gemm(device).run(x, weights, 1, True, seg_indptr=indptr,
                                  weight_indices=torch.zeros(1, dtype=torch.int64, device=device))
    except Exception as e:  # a failed JIT build surfaces as whatever the build tooling raised
        log.warning("flashinfer's segment GEMM does not run on %s (%s: %s); LoRA takes the torch path there",
                    device, type(e).__name__, e)
        return False
    return True


@functools.cache
def _segment_gemm(device: torch.device):
    return _flashinfer().SegmentGEMMWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.int8, device=device))


def _segments(plan, device: torch.device) -> tuple:
    """The segment GEMM's arguments for a step's plan (host tensors), on `device`: made by the
    step's first projection, reused by the others."""
    key = ("segment_gemm", device)
    if key not in plan.device_copies:
        starts, counts = plan.lora_start.tolist(), plan.lora_count.tolist()
        rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)]) if starts else None
        indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
        plan.device_copies[key] = (len(starts), rows if rows is None else rows.to(device), indptr.to(device),
                                   plan.lora_slots.to(device))
    return plan.device_copies[key]


def add_lora_modules(y: torch.Tensor, x: torch.Tensor, mods, plan) -> None:
    """kernels.lora.add_lora_modules on CUDA (same semantics). The pool's stacks are used at
    their full rank: past each adapter's rank they hold zeros, and slicing them to the step's
    rank would make them non-contiguous, which the kernel cannot read."""
    num_segments, rows, indptr, slots = _segments(plan, x.device)
    if not num_segments:
        return
    xs = x.index_select(0, rows).contiguous()
    gemm = _segment_gemm(x.device)
    for m in mods.modules:
        # lora_A's and lora_B's outputs in the weights' dtype, as in PEFT
        h = gemm.run(xs, m.a, num_segments, True, seg_indptr=indptr, weight_indices=slots)
        delta = gemm.run(h, m.b, num_segments, True, seg_indptr=indptr, weight_indices=slots)
        y[:, m.column:m.column + m.width].index_add_(0, rows, delta)


def warm_up(device: torch.device, dtype: torch.dtype) -> bool:
    """Build and try the segment GEMM where the engine will use it, so flashinfer's JIT compile
    happens while the engine starts rather than in its first LoRA request. False where it is
    not used (CPU, fp32, no flashinfer, or it failed to build)."""
    return device.type == "cuda" and dtype in DTYPES and _flashinfer() is not None and _runs_on(device, dtype)
