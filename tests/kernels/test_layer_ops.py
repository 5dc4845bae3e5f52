"""layer_ops: the native pointwise kernels (RMSNorm with fused residual add, RoPE + KV-cache
write, SiLU-mul) against their torch reference paths (native=False) and float64 formulas.

fp32 results must agree to a few fp32 ulps. In bf16 the native code rounds at the same
points as the torch code, so nearly every element is identical; the rare differences come
from a last-bit difference in an fp32 intermediate landing on a bf16 rounding boundary. A
missing or extra rounding step would instead change about a quarter of all elements."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from loragate.engine.models.llama import rope_tables
from loragate.kernels import layer_ops, native

ROWS = (1, 3, 16, 100, 1024)  # 100 and 1024 rows cross the native code's 32K-element threading threshold
WIDTHS = (64, 576, 1536)
DTYPES = (torch.float32, torch.bfloat16)


def test_native_library_is_available():
    assert native.library() is not None


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between two bf16 tensors (+0 and -0 coincide)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).int() & 0xFFFF
        return torch.where(bits & 0x8000 != 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def assert_native_matches_reference(got: torch.Tensor, want: torch.Tensor, what: str, fp32_rtol: float = 2e-6) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=fp32_rtol, msg=lambda m: f"{what}: {m}")
        return
    ulps = bf16_ulps(got, want)
    # Below 1e-30 only the size of the rounding error matters: the native exp saturates at
    # 2^127 where torch's reaches inf, so silu(-90) comes out ~1e-36 instead of -0.
    ulps[(got.double() - want.double()).abs() < 1e-30] = 0
    num_differ = int((ulps > 0).sum())
    allowed = max(4, int(0.02 * got.numel()))
    assert int(ulps.max()) <= 2, f"{what}: an element is {int(ulps.max())} bf16 ulps from the reference"
    assert num_differ <= allowed, f"{what}: {num_differ} of {got.numel()} elements differ from the reference"


def assert_close_to_float64(got: torch.Tensor, want: torch.Tensor, what: str, scale: torch.Tensor | None = None) -> None:
    """Independent check of the formula. fp32: 1e-5 relative. bf16 (8-bit significand): each
    rounding errs by <= 2^-8 of its operand and there are two in sequence (or two products
    then their sum), so |err| <= 2^-7 * scale, where scale bounds the operands' magnitudes
    (default: the result's)."""
    is_fp32 = got.dtype == torch.float32
    got = got.double()
    scale = want.abs() if scale is None else scale
    bound = (1e-5 if is_fp32 else 1.01 * 2.0 ** -7) * scale + (1e-6 if is_fp32 else 1e-30)
    err = (got - want).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements off the float64 result; worst: "
        f"got {float(got.view(-1)[worst]):.6g}, want {float(want.view(-1)[worst]):.6g}")


# ---------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", list(itertools.product(ROWS, WIDTHS)))
@pytest.mark.parametrize("with_residual", (False, True))
def test_rms_norm(dtype, rows, width, with_residual):
    g = torch.Generator().manual_seed(rows * 10007 + width)
    x0 = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    delta = (torch.randn(rows, width, generator=g) * 2).to(dtype) if with_residual else None
    delta_before = None if delta is None else delta.clone()
    weight = (torch.randn(width, generator=g) * 0.5 + 1).to(dtype)
    eps = 1e-5
    x_native, x_ref = x0.clone(), x0.clone()
    out_native = layer_ops.rms_norm(x_native, weight, eps, delta, native=True)
    out_ref = layer_ops.rms_norm(x_ref, weight, eps, delta, native=False)
    label = f"rms_norm {dtype} {rows}x{width} residual={with_residual}"
    assert_native_matches_reference(out_native, out_ref, label)

    # The residual stream: x += delta in place (rounded to x's dtype, like torch's add_), and
    # untouched without a delta. The delta itself is never modified.
    expected_x = x0 + delta if with_residual else x0
    assert torch.equal(x_native, expected_x), f"{label}: native in-place x differs from x + delta"
    assert torch.equal(x_ref, expected_x), f"{label}: reference in-place x differs from x + delta"
    if with_residual:
        assert torch.equal(delta, delta_before)
    assert_close_to_float64(out_native, rms_norm_float64(expected_x, weight, eps), label)


@pytest.mark.parametrize("rows,width", [(1, 640), (16, 640), (100, 640), (7, 1536)])
@pytest.mark.parametrize("with_residual", (False, True))
def test_rms_norm_with_an_fp32_weight_rounds_after_it(rows, width, with_residual):
    """Gemma's norm on bf16 activations: the fp32 weight (1 + the checkpoint's) scales the fp32
    normalised row, then the product is rounded once. Against transformers' Gemma3RMSNorm too."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(rows * 31 + width)
    x0 = (torch.randn(rows, width, generator=g) * 3).to(torch.bfloat16)
    delta = (torch.randn(rows, width, generator=g) * 2).to(torch.bfloat16) if with_residual else None
    hf = Gemma3RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(width, generator=g) * 0.5)
    multiplier = 1.0 + hf.weight.detach().to(torch.bfloat16).float()
    hf.weight.data = hf.weight.data.to(torch.bfloat16)
    x_native, x_ref = x0.clone(), x0.clone()
    out_native = layer_ops.rms_norm(x_native, multiplier, 1e-6, delta, native=True)
    out_ref = layer_ops.rms_norm(x_ref, multiplier, 1e-6, delta, native=False)
    label = f"fp32-weight rms_norm {rows}x{width} residual={with_residual}"
    assert_native_matches_reference(out_native, out_ref, label)
    expected_x = x0 + delta if with_residual else x0
    assert torch.equal(x_native, expected_x) and torch.equal(x_ref, expected_x)
    with torch.no_grad():
        assert_native_matches_reference(out_native, hf(expected_x), f"{label} vs transformers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,kv_heads,d", [(1, 4, 1, 256), (7, 16, 8, 128), (100, 8, 2, 64)])
@pytest.mark.parametrize("fp32_weight", (False, True), ids=("qwen3", "gemma3"))
def test_rms_norm_heads(dtype, rows, heads, kv_heads, d, fp32_weight):
    """q/k head norms in place: the native kernel against the torch path and against
    transformers' Qwen3RMSNorm / Gemma3RMSNorm per head; v heads untouched."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    g = torch.Generator().manual_seed(rows * 7 + d)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g) * 3).to(dtype)
    raw = [torch.randn(d, generator=g) * 0.5 + (0 if fp32_weight else 1) for _ in range(2)]
    hf = []
    for w in raw:
        norm = Gemma3RMSNorm(d, eps=1e-6) if fp32_weight else Qwen3RMSNorm(d, eps=1e-6)
        norm.weight.data = w.to(dtype)
        hf.append(norm)
    weights = [1.0 + n.weight.float() if fp32_weight else n.weight.data for n in hf]
    native_out, ref_out = qkv.clone(), qkv.clone()
    layer_ops.rms_norm_heads(native_out, *weights, heads, kv_heads, d, 1e-6, native=True)
    layer_ops.rms_norm_heads(ref_out, *weights, heads, kv_heads, d, 1e-6, native=False)
    label = f"rms_norm_heads {dtype} {rows}x({heads}+{kv_heads}) d={d} fp32_weight={fp32_weight}"
    assert_native_matches_reference(native_out, ref_out, label)
    q_end, k_end = heads * d, (heads + kv_heads) * d
    assert torch.equal(native_out[:, k_end:], qkv[:, k_end:]), f"{label}: v heads changed"
    with torch.no_grad():
        want = torch.cat((hf[0](qkv[:, :q_end].view(rows, heads, d)).view(rows, -1),
                          hf[1](qkv[:, q_end:k_end].view(rows, kv_heads, d)).view(rows, -1)), dim=1)
    assert_native_matches_reference(native_out[:, :k_end].contiguous(), want, f"{label} vs transformers")


def test_rms_norm_rows_are_independent():
    # Row t's output depends on row t only: a kernel that mixes up the per-row scale, or that
    # threads over rows incorrectly, fails this even where values are close overall.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, 576, generator=g) * torch.logspace(-2, 2, 1024)[:, None]  # very different row scales
    weight = torch.randn(576, generator=g)
    out = layer_ops.rms_norm(x.clone(), weight, 1e-6, native=True)
    for t in (0, 1, 511, 1023):
        single = layer_ops.rms_norm(x[t:t + 1].clone(), weight, 1e-6, native=True)
        torch.testing.assert_close(out[t:t + 1], single, atol=0, rtol=0)
    torch.testing.assert_close(out.double(), rms_norm_float64(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# RoPE + KV-cache write


def rope_float64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    """HF rotate-half RoPE over the tables' width (the rest of each head passes through);
    x [T, heads, d]. Returns (result, |x*cos| + |rotated*sin|)."""
    x = x.double()
    c = cos.double()[positions].unsqueeze(1)
    s = sin.double()[positions].unsqueeze(1)
    x, passed = x[..., :cos.shape[1]], x[..., cos.shape[1]:]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (torch.cat((x * c + rotated * s, passed), dim=-1),
            torch.cat(((x * c).abs() + (rotated * s).abs(), passed.abs()), dim=-1))


ROPE_CASES = [
    # (rows, heads, kv_heads, head_dim, block_size, tables, partial_rotary_factor)
    (1, 4, 2, 64, 16, "llama", 1.0),
    (3, 6, 2, 128, 32, "random", 1.0),
    (16, 4, 1, 64, 16, "random", 1.0),
    (100, 4, 4, 128, 16, "llama", 1.0),  # threaded: 100 * 8 * 128 >= 32K
    (1024, 3, 1, 64, 32, "llama", 1.0),
    (1024, 8, 2, 128, 16, "random", 1.0),
    (5, 4, 2, 96, 16, "llama", 1.0),  # Phi-3-mini's head size
    (7, 6, 2, 128, 16, "llama", 0.75),  # Phi-4-mini: 96 of 128 dims rotate
    (200, 4, 2, 64, 32, "random", 0.5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,kv_heads,head_dim,block_size,tables,partial", ROPE_CASES)
def test_rope_write_kv(dtype, rows, heads, kv_heads, head_dim, block_size, tables, partial):
    g = torch.Generator().manual_seed(rows + heads + head_dim)
    max_pos = 4096
    if tables == "llama":
        config = types.SimpleNamespace(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": partial})
        cos, sin = rope_tables(config, max_pos)
    else:  # arbitrary tables: catches a kernel that recomputes cos/sin itself or mixes the halves
        width = int(head_dim * partial)
        cos, sin = torch.randn(max_pos, width, generator=g), torch.randn(max_pos, width, generator=g)
    assert cos.shape == (max_pos, int(head_dim * partial))
    cos, sin = cos.to(dtype), sin.to(dtype)  # the model keeps its tables in its own dtype
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(rows, width, generator=g) * 2).to(dtype)
    positions = torch.randint(0, max_pos, (rows,), generator=g)
    if rows > 1:
        positions[0] = 0  # identity rotation (not for a single row, which must really rotate)
    num_blocks = -(-rows // block_size) + 4
    slots = torch.randperm(num_blocks * block_size, generator=g)[:rows]  # scattered, distinct
    sentinel = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)

    results = {}
    for use_native in (True, False):
        k_cache, v_cache = sentinel.clone(), (sentinel * 2).clone()
        q, k, v = layer_ops.rope_write_kv(qkv.clone(), positions, cos, sin, heads, kv_heads, head_dim, slots,
                                          k_cache, v_cache, native=use_native)
        assert q.shape == (rows, heads, head_dim) and k.shape == v.shape == (rows, kv_heads, head_dim)
        results[use_native] = (q, k, v, k_cache, v_cache)
    label = f"rope {dtype} rows={rows} heads={heads}/{kv_heads} d={head_dim} tables={tables} partial={partial}"
    (qn, kn, vn, kcn, vcn), (qr, kr, vr, kcr, vcr) = results[True], results[False]
    assert_native_matches_reference(qn, qr, f"{label}: q")
    assert_native_matches_reference(kn, kr, f"{label}: k")
    assert torch.equal(vn, vr), f"{label}: v must pass through unchanged"

    # Against float64 RoPE of the input heads; v is a plain copy of its slice of qkv.
    heads_in = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    want_q, scale_q = rope_float64(heads_in[:, :heads], cos, sin, positions)
    assert_close_to_float64(qn, want_q, f"{label}: q", scale=scale_q)
    want_k, scale_k = rope_float64(heads_in[:, heads:heads + kv_heads], cos, sin, positions)
    assert_close_to_float64(kn, want_k, f"{label}: k", scale=scale_k)
    assert torch.equal(vn, heads_in[:, heads + kv_heads:])

    for name, cache, written, base in (("k_cache", kcn, kn, sentinel), ("v_cache", vcn, vn, sentinel * 2)):
        at_slots = cache[slots // block_size, :, slots % block_size]
        assert torch.equal(at_slots, written), f"{label}: {name} at the slots differs from the returned {name[0]}"
        untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        flat = cache.permute(0, 2, 1, 3).reshape(num_blocks * block_size, kv_heads, head_dim)
        flat_base = base.permute(0, 2, 1, 3).reshape(num_blocks * block_size, kv_heads, head_dim)
        assert torch.equal(flat[untouched], flat_base[untouched]), f"{label}: {name} changed outside the slots"
    assert_native_matches_reference(kcn, kcr, f"{label}: k_cache")
    assert torch.equal(vcn, vcr), f"{label}: v_cache"


# ---------------------------------------------------------------------------------------------
# SiLU-mul


def silu_mul_float64(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", list(itertools.product(ROWS, WIDTHS)))
def test_silu_mul(dtype, rows, width):
    g = torch.Generator().manual_seed(rows * 31 + width)
    # Gates span the saturated regions too (silu(x) ~ 0 for x << 0, ~ x for x >> 0).
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0, -0.0]).to(dtype)
    before = gate_up.clone()
    out_native = layer_ops.silu_mul(gate_up, native=True)
    out_ref = layer_ops.silu_mul(gate_up, native=False)
    label = f"silu_mul {dtype} {rows}x{width}"
    assert out_native.shape == (rows, width)
    assert torch.equal(gate_up, before), f"{label}: input modified"
    # fp32: the native exp (csrc/common.h exp_inplace_sum) is a degree-6 polynomial whose
    # relative error reaches 5.6e-6 (not the 2e-7 its comment says), so silu carries up to ~6.4e-6.
    assert_native_matches_reference(out_native, out_ref, label, fp32_rtol=1e-5)
    assert_close_to_float64(out_native, silu_mul_float64(gate_up), label)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_widest_supported_row(dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(3, 2 * 16384, generator=g) * 3).to(dtype)
    assert_native_matches_reference(layer_ops.silu_mul(gate_up, native=True), layer_ops.silu_mul(gate_up, native=False),
                                    f"silu_mul {dtype} width 16384", fp32_rtol=1e-5)


def test_silu_mul_intermediate_size_above_16384():
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2, 2 * 18944, generator=g).to(torch.bfloat16)
    assert_native_matches_reference(layer_ops.silu_mul(gate_up, native=True), layer_ops.silu_mul(gate_up, native=False),
                                    "silu_mul width 18944")


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_results_do_not_depend_on_thread_count(dtype):
    # 1024 x 1536 is far above the threading threshold: splitting rows over threads must not
    # change any bit.
    g = torch.Generator().manual_seed(17)
    x = torch.randn(1024, 1536, generator=g).to(dtype)
    delta = torch.randn(1024, 1536, generator=g).to(dtype)
    weight = torch.randn(1536, generator=g).to(dtype)
    gate_up = torch.randn(1024, 2 * 1536, generator=g).to(dtype)

    def run():
        x_copy = x.clone()
        return layer_ops.rms_norm(x_copy, weight, 1e-6, delta, native=True), x_copy, layer_ops.silu_mul(gate_up, native=True)

    many = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
