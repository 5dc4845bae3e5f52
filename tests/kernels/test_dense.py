"""kernels.dense: pack_weight + dense_linear equal F.linear (bf16 through oneDNN's packed
layout where available, fp32 through the plain one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loragate.kernels import dense

ROWS = (1, 2, 16, 300)
IN_FEATURES, OUT_FEATURES = 576, 1536


def make(dtype, rows, with_bias, seed, in_features=IN_FEATURES, out_features=OUT_FEATURES):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    return x, w, b


def float64_linear(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", (False, True))
def test_bf16_packed_linear(rows, with_bias):
    x, w, b = make(torch.bfloat16, rows, with_bias, seed=rows)
    w_before = w.clone()
    packed = dense.pack_weight(w)
    if dense._mkldnn_linear_available():
        assert packed.is_mkldnn  # the packed path is the one under test
    got = dense.dense_linear(x, packed, b)
    want = F.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, OUT_FEATURES)
    assert torch.equal(w, w_before)
    # Both accumulate in fp32 and round once to bf16, but in different orders: they agree to
    # about one bf16 ulp, and both are within bf16 rounding of the float64 product.
    truth = float64_linear(x, w, b)
    torch.testing.assert_close(got.double(), truth, atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(want.double(), truth, atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1.6e-2)
    assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", (False, True))
def test_fp32_linear(rows, with_bias):
    x, w, b = make(torch.float32, rows, with_bias, seed=100 + rows)
    packed = dense.pack_weight(w)
    got = dense.dense_linear(x, packed, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), float64_linear(x, w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_leading_batch_dims_and_reuse_of_the_packed_weight(dtype):
    # x [..., in]; one packed weight serves many calls with different row counts.
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(96, 64, generator=g) / 8).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    packed = dense.pack_weight(w)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    for shape in ((1, 64), (5, 64), (2, 3, 64), (300, 64), (1, 64)):
        x = torch.randn(*shape, generator=g).to(dtype)
        got = dense.dense_linear(x, packed, b)
        assert got.shape == (*shape[:-1], 96)
        torch.testing.assert_close(got, F.linear(x, w, b), **tol)
        torch.testing.assert_close(got.double(), float64_linear(x, w, b), **tol)
