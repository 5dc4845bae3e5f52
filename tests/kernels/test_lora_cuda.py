"""The CUDA path of the segmented LoRA (flashinfer's segment GEMM, kernels/lora_cuda.py)
against the float64 reference and the torch path on the same GPU. Skips without a CUDA GPU
or without flashinfer (`pip install .[cuda]`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loragate.kernels import lora_cuda
from loragate.kernels.lora import LoraModule, LoraModules, add_lora_modules, plan_segments

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
needs_flashinfer = pytest.mark.skipif(lora_cuda._flashinfer() is None, reason="flashinfer is not installed")

NUM_SLOTS = 6
CASES = [  # in, module widths, pool rank, step rank, segment lengths (slot -1 every third segment)
    (64, [40, 16, 24], 16, 16, [1, 2, 3, 4]),
    (128, [64, 32], 64, 15, [16, 17, 5, 1]),
    (256, [256], 16, 8, [300, 1, 1, 70]),
]


def make(in_features, widths, pool_rank, rank, lengths, dtype, device):
    g = torch.Generator().manual_seed(in_features + rank)
    modules, column = [], 3
    for width in widths:
        a = torch.zeros(NUM_SLOTS, pool_rank, in_features)
        b = torch.zeros(NUM_SLOTS, width, pool_rank)
        a[:, :rank] = torch.randn(NUM_SLOTS, rank, in_features, generator=g) * 0.2
        b[:, :, :rank] = torch.randn(NUM_SLOTS, width, rank, generator=g) * 0.2
        modules.append(LoraModule(column, a.to(device, dtype), b.to(device, dtype)))
        column += width
    indptr, slots = [0], []
    for i, n in enumerate(lengths):
        slots.append(-1 if i % 3 == 2 else (5 * i + 1) % NUM_SLOTS)
        indptr.append(indptr[-1] + n)
    x = torch.randn(indptr[-1], in_features, generator=g).to(device, dtype)
    y = torch.randn(indptr[-1], column + 5, generator=g).to(device, dtype)
    return LoraModules(modules), x, y, indptr, slots


def float64_delta(m, x, indptr, slots, rank):
    out = torch.zeros(x.shape[0], m.width, dtype=torch.float64)
    for i, s in enumerate(slots):
        if s >= 0:
            rows = x[indptr[i]:indptr[i + 1]].double().cpu()
            out[indptr[i]:indptr[i + 1]] = rows @ m.a[s, :rank].double().cpu().T @ m.b[s, :, :rank].double().cpu().T
    return out


@needs_gpu
@needs_flashinfer
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("in_features, widths, pool_rank, rank, lengths", CASES)
def test_flashinfer_segment_gemm_matches_float64_and_the_torch_path(in_features, widths, pool_rank, rank, lengths, dtype):
    mods, x, y, indptr, slots = make(in_features, widths, pool_rank, rank, lengths, dtype, "cuda")
    assert lora_cuda.usable(x, mods)
    plan = plan_segments(indptr, slots)
    fast, torch_path = y.clone(), y.clone()
    add_lora_modules(fast, x, mods, plan, rank)
    add_lora_modules(torch_path, x, mods, plan, rank, native=False)
    for m in mods.modules:
        cols = slice(m.column, m.column + m.width)
        want = y[:, cols].double().cpu() + float64_delta(m, x, indptr, slots, rank)
        torch.testing.assert_close(fast[:, cols].double().cpu(), want, atol=6e-2, rtol=3e-2)
        torch.testing.assert_close(fast[:, cols], torch_path[:, cols], atol=3e-2, rtol=2e-2)
    untouched = [c for c in range(y.shape[1]) if not any(m.column <= c < m.column + m.width for m in mods.modules)]
    assert torch.equal(fast[:, untouched], y[:, untouched])


@needs_gpu
def test_the_torch_path_runs_on_the_gpu_too():
    """float32 (which the segment GEMM does not take) and installs without flashinfer."""
    mods, x, y, indptr, slots = make(64, [40, 24], 16, 8, [3, 1, 20, 2], torch.float32, "cuda")
    assert not lora_cuda.usable(x, mods)
    plan = plan_segments(indptr, slots)
    before = y.clone()
    add_lora_modules(y, x, mods, plan, 8)
    for m in mods.modules:
        cols = slice(m.column, m.column + m.width)
        want = before[:, cols].double().cpu() + float64_delta(m, x, indptr, slots, 8)
        torch.testing.assert_close(y[:, cols].double().cpu(), want, atol=1e-4, rtol=1e-4)


def test_cpu_work_never_imports_flashinfer():
    """The CUDA path is one lazily imported module: a CPU process must not need flashinfer."""
    code = ("import sys, torch\n"
            "from loragate.kernels.lora import LoraModule, LoraModules, add_lora_modules, plan_segments\n"
            "a, b = torch.randn(2, 16, 64), torch.randn(2, 8, 16)\n"
            "y = torch.zeros(3, 8)\n"
            "add_lora_modules(y, torch.randn(3, 64), LoraModules([LoraModule(0, a, b)]), plan_segments([0, 3], [1]), 16)\n"
            "assert y.abs().sum() > 0\n"
            "assert 'flashinfer' not in sys.modules, 'flashinfer was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class FakeSegmentGEMM:
    """flashinfer's SegmentGEMMWrapper.run as documented, in torch, with the checks the real
    kernel relies on (it reads weights at w + index * d_out * d_in and rows at x + start * d_in)."""

    def __init__(self, workspace):
        self.calls = 0

    def run(self, x, weights, batch_size, weight_column_major, out=None, seg_lens=None, seg_indptr=None,
            weight_indices=None):
        assert weight_column_major and weights.is_contiguous() and x.is_contiguous()
        assert seg_indptr.dtype == weight_indices.dtype == torch.int64
        assert seg_indptr.shape == (batch_size + 1,) and weight_indices.shape == (batch_size,)
        assert int(seg_indptr[0]) == 0 and int(seg_indptr[-1]) == x.shape[0]
        self.calls += 1
        y = torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype)
        for i in range(batch_size):
            s, e = int(seg_indptr[i]), int(seg_indptr[i + 1])
            y[s:e] = x[s:e] @ weights[int(weight_indices[i])].T
        return y


def test_cuda_glue_feeds_the_segment_gemm_what_its_documentation_asks(monkeypatch):
    """Runs kernels/lora_cuda.py on CPU tensors against a stand-in for flashinfer, so the
    argument plumbing (row gather, indptr, slot indices, the column slices) is checked here
    too, not only on a GPU."""
    fake = FakeSegmentGEMM(None)
    monkeypatch.setattr(lora_cuda, "_flashinfer", lambda: type("flashinfer", (), {"SegmentGEMMWrapper": None}))
    monkeypatch.setattr(lora_cuda, "_segment_gemm", lambda device: fake)
    mods, x, y, indptr, slots = make(64, [40, 16, 24], 16, 12, [3, 1, 70, 2, 5], torch.float32, "cpu")
    before = y.clone()
    lora_cuda.add_lora_modules(y, x, mods, plan_segments(indptr, slots))
    assert fake.calls == 2 * len(mods.modules)
    for m in mods.modules:
        cols = slice(m.column, m.column + m.width)
        torch.testing.assert_close(y[:, cols].double(), before[:, cols].double() + float64_delta(m, x, indptr, slots, 12),
                                   atol=1e-4, rtol=1e-4)
    untouched = [c for c in range(y.shape[1]) if not any(m.column <= c < m.column + m.width for m in mods.modules)]
    assert torch.equal(y[:, untouched], before[:, untouched])


def test_the_segment_gemm_is_tried_once_and_a_failed_build_leaves_lora_on_the_torch_path(monkeypatch, caplog):
    """The engine warms it up at start-up on CUDA, so flashinfer's JIT compile happens there; a
    build that fails (no nvcc in the image, say) gives one warning, not failing requests."""
    fake = FakeSegmentGEMM(None)
    monkeypatch.setattr(lora_cuda, "_segment_gemm", lambda device: fake)
    assert not lora_cuda.warm_up(torch.device("cpu"), torch.bfloat16)  # not CUDA: not used, not tried
    assert fake.calls == 0
    lora_cuda._runs_on.cache_clear()
    assert lora_cuda._runs_on(torch.device("cpu"), torch.float32) and fake.calls == 1
    assert lora_cuda._runs_on(torch.device("cpu"), torch.float32) and fake.calls == 1  # once per device and dtype

    def failing_build(*args, **kwargs):
        raise RuntimeError("ninja: build stopped: nvcc not found")

    monkeypatch.setattr(fake, "run", failing_build)
    lora_cuda._runs_on.cache_clear()
    with caplog.at_level("WARNING", logger="loragate.kernels"):
        assert not lora_cuda._runs_on(torch.device("cpu"), torch.float32)
    assert "nvcc not found" in caplog.text and "torch path" in caplog.text
    lora_cuda._runs_on.cache_clear()
