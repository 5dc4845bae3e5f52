"""kernels.dense: pack_weight + dense_linear equal F.linear (bf16 through the native kernels of
the AMX tile layout, AMX's and AVX-512 BF16's, and through oneDNN's packed layout where each is
available, fp32 through the plain one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loragate.kernels import dense

ROWS = (1, 2, 16, 300)
# The AMX kernel works in chunks of 32 rows inside blocks of 256, the AVX-512 BF16 one in
# chunks of 8: edges on all sides (with AMX, from TiledWeight.MAX_ROWS rows on the oneDNN copy
# takes over).
TILED_ROWS = (1, 3, 7, 8, 9, 16, 17, 31, 32, 33, 255, 256, 300, 600)
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


def check_bf16_linear(packed, x, w, b):
    got = dense.dense_linear(x, packed, b)
    want = F.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # Both accumulate in fp32 and round once to bf16, but in different orders: they agree to
    # about one bf16 ulp, and both are within bf16 rounding of the float64 product.
    truth = float64_linear(x, w, b)
    torch.testing.assert_close(got.double(), truth, atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(want.double(), truth, atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1.6e-2)
    assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", (False, True))
def test_bf16_onednn_packed_linear(rows, with_bias, monkeypatch):
    monkeypatch.setattr(dense.native, "tiled_gemm_kernel", lambda: None)
    x, w, b = make(torch.bfloat16, rows, with_bias, seed=rows)
    w_before = w.clone()
    packed = dense.pack_weight(w)
    if dense._mkldnn_linear_available():
        assert packed.is_mkldnn  # the packed path is the one under test
    check_bf16_linear(packed, x, w, b)
    assert torch.equal(w, w_before)


needs_amx = pytest.mark.skipif(not dense.native.amx_available(), reason="no AMX on this CPU (or native kernels off)")
needs_avx512_bf16 = pytest.mark.skipif(dense.native.library() is None or dense.native.library().avx512_bf16_available(),
                                       reason="no AVX-512 BF16 on this CPU (or native kernels off)")
TILED_KERNELS = (pytest.param("amx", marks=needs_amx), pytest.param("avx512_bf16", marks=needs_avx512_bf16))
needs_tiled = pytest.mark.skipif(dense.native.tiled_gemm_kernel() is None, reason="no native tile-layout GEMM here")
needs_int4 = pytest.mark.skipif(not dense.int4_available(), reason="torch has no CPU int4 weight-only kernel")
needs_onednn = pytest.mark.skipif(not dense._mkldnn_linear_available(), reason="no oneDNN packed layout")


@pytest.mark.parametrize("kernel", TILED_KERNELS)
@pytest.mark.parametrize("rows", TILED_ROWS)
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("shape", ((1536, 576), (48, 64), (16, 1536)))  # (out, in): two-block pairs, an odd block
def test_bf16_tiled_linear(kernel, rows, with_bias, shape):
    x, w, b = make(torch.bfloat16, rows, with_bias, seed=rows, in_features=shape[1], out_features=shape[0])
    w_before = w.clone()
    packed = dense.TiledWeight(w, kernel)
    if kernel == dense.native.tiled_gemm_kernel():
        assert isinstance(dense.pack_weight(w), dense.TiledWeight)  # the CPU's own kernel is the one packed for
    # AMX keeps a oneDNN copy for prefill sizes; the AVX-512 BF16 kernel runs every size itself.
    assert (packed.large is not None) == (kernel == "amx" and dense._mkldnn_linear_available())
    check_bf16_linear(packed, x, w, b)
    packed.large = None  # the native kernel at every size, as where oneDNN is missing
    check_bf16_linear(packed, x, w, b)
    assert torch.equal(w, w_before)


@pytest.mark.parametrize("kernel", TILED_KERNELS)
def test_tiled_strided_and_batched_activations(kernel):
    x, w, b = make(torch.bfloat16, 40, True, seed=7)
    packed = dense.TiledWeight(w, kernel)
    packed.large = None  # 40 rows: the native kernel, not the oneDNN copy
    wide = torch.cat([x, x], dim=1)[:, :IN_FEATURES]  # rows with a stride larger than their width
    torch.testing.assert_close(dense.dense_linear(wide, packed, b), dense.dense_linear(x, packed, b), atol=0, rtol=0)
    batched = dense.dense_linear(x.view(4, 10, IN_FEATURES), packed, b)
    torch.testing.assert_close(batched.view(40, -1), dense.dense_linear(x, packed, b), atol=0, rtol=0)
    assert dense.dense_linear(x[:0], packed, b).shape == (0, OUT_FEATURES)


def test_tiles_refuse_shapes_and_dtypes_they_cannot_run():
    for w in (torch.zeros(24, 64, dtype=torch.bfloat16), torch.zeros(32, 48, dtype=torch.bfloat16),
              torch.zeros(32, 64)):
        assert not dense.TiledWeight.fits(w)
        with pytest.raises(ValueError, match="tile packing needs"):
            dense.TiledWeight(w)
        assert not isinstance(dense.pack_weight(w), dense.TiledWeight)


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


def int4_reference(w: torch.Tensor, group: int = dense.GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented quantization written out: per row and group of inputs, 16 levels from
    the group's min to its max. Returns (W', the error bound per element: half a step, plus
    the rounding of scale, offset and W' to the dtype, relative to the group's largest value)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((high - low) / 15).clamp(min=1e-6)
    levels = ((g - low) / step).round().clamp(0, 15)
    step_r, low_r = step.to(w.dtype).float(), (low + 8 * step).to(w.dtype).float()
    deq = (levels - 8) * step_r + low_r
    eps = torch.finfo(w.dtype).eps
    bound = step * 0.5 + 16 * eps * torch.maximum(low.abs(), high.abs())
    return deq.reshape(out_f, in_f).to(w.dtype), bound.expand_as(g).reshape(out_f, in_f)


@needs_int4
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("rows", (1, 2, 3, 4, 5, 16, 300))
@pytest.mark.parametrize("with_bias", (False, True))
def test_int4_weight_equals_linear_on_the_quantized_weight(dtype, rows, with_bias):
    """Rows up to INT4_MAX_ROWS go through torch's int4 kernel, more through the dense copy:
    both compute F.linear with the weight rounded as documented."""
    x, w, b = make(dtype, rows, with_bias, seed=200 + rows, in_features=896, out_features=160)
    packed = dense.pack_weight(w, int4=True)
    assert isinstance(packed, dense.Int4Weight)
    w_q, bound = int4_reference(w)
    assert ((w_q.float() - w.float()).abs() <= bound).all()
    assert (w_q != w).any()
    got = dense.dense_linear(x, packed, b)
    assert got.dtype == dtype and got.shape == (rows, 160)
    truth = float64_linear(x, w_q, b)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(got.double(), truth, **tol)
    # The tolerance tells the two apart: a path that ignored the quantization would fail.
    assert not torch.allclose(float64_linear(x, w, b), truth, atol=tol["atol"], rtol=tol["rtol"])


@needs_int4
def test_int4_kernel_path_and_dense_copy_agree_across_the_row_threshold():
    x, w, _ = make(torch.bfloat16, dense.INT4_MAX_ROWS + 1, False, seed=7, in_features=256, out_features=64)
    packed = dense.pack_weight(w, int4=True)
    many = dense.dense_linear(x, packed, None)  # the dense copy
    few = torch.cat([dense.dense_linear(x[i:i + 1], packed, None) for i in range(len(x))])  # the int4 kernel
    torch.testing.assert_close(few, many, atol=3e-2, rtol=1.6e-2)
    # Leading batch dims are flattened for the kernel and restored.
    assert dense.dense_linear(x[:4].reshape(2, 2, 256), packed, None).shape == (2, 2, 64)


@pytest.mark.parametrize("in_features, out_features", [(dense.GROUP_SIZE + 8, 16), (dense.GROUP_SIZE, 100)])
def test_int4_falls_back_to_the_dense_layout_when_the_shape_does_not_allow_it(in_features, out_features):
    _, w, _ = make(torch.bfloat16, 1, False, seed=3, in_features=in_features, out_features=out_features)
    packed = dense.pack_weight(w, int4=True)
    assert not isinstance(packed, dense.Int4Weight)
    x = torch.randn(2, in_features).to(torch.bfloat16)
    torch.testing.assert_close(dense.dense_linear(x, packed, None), F.linear(x, w), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("layout", ["plain fp32", pytest.param("tiled", marks=needs_tiled),
                                    pytest.param("onednn", marks=needs_onednn), pytest.param("int4", marks=needs_int4)])
def test_row_norms_come_out_of_every_packed_layout(layout):
    """DoRA needs ||W||^2 per output row after the plain weight is gone."""
    _, w, _ = make(torch.float32 if layout == "plain fp32" else torch.bfloat16, 1, False, seed=7)
    if layout == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
    elif layout == "int4":
        packed = dense.Int4Weight(w)
        w = dense.dense_linear(torch.eye(IN_FEATURES, dtype=torch.bfloat16), packed, None).T  # the weight it holds
    else:
        packed = dense.pack_weight(w)
    assert layout != "tiled" or isinstance(packed, dense.TiledWeight)
    torch.testing.assert_close(dense.row_norms_sq(packed, IN_FEATURES), w.double().square().sum(1).float(),
                               rtol=1e-5, atol=0)
