"""Native CPU kernels (kernels/csrc/*.c), compiled once with the system C compiler and loaded
with ctypes. Plain C with no torch headers: builds in about a second. Cached per source
hash and CPU under $LORAGATE_HOME/build; when no compiler is found, or LORAGATE_CPU_KERNELS=0,
callers fall back to the torch reference path."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("loragate.kernels")
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "paged_attention.c", _CSRC / "pointwise.c", _CSRC / "lora.c", _CSRC / "lora_amx.c",
            _CSRC / "amx_gemm.c", _CSRC / "avx512_bf16_gemm.c", _CSRC / "decoder_layers.c"]
# -fno-strict-aliasing: the kernels reinterpret fp32 rows as uint32 bits to convert bf16.
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-strict-aliasing", "-fopenmp",
          "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _build_dir() -> Path:
    return Path(os.environ.get("LORAGATE_HOME") or "~/.cache/loragate").expanduser() / "build"


def _compile() -> Path:
    digest = hashlib.sha256(" ".join(_FLAGS).encode() + _cpu_id().encode())
    for f in sorted(_CSRC.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    target = _build_dir() / f"loragate_cpu-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *_FLAGS, "-o", str(out), *map(str, _SOURCES), "-lm"], check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: concurrent builders both end with a whole file
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when native kernels are disabled or cannot be built."""
    global _lib, _tried
    if _tried:  # every kernel call asks: no lock once decided
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("LORAGATE_CPU_KERNELS", "1") == "0":
            return None
        try:
            lib = ctypes.CDLL(str(_compile()))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or e
            log.warning("native CPU kernels unavailable, using the torch path: %s", detail)
            return None
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        signatures = {
            "paged_attention": [ptr, i64, ptr, ptr, ptr, i64, i32, ptr, ptr, ptr, ptr, i64, i32, i32, i32,
                                i32, f32, i32, i32, i32, f32],
            "rms_norm": [ptr, ptr, ptr, ptr, i64, i32, f32, i32, i32, i32],
            "rope_write_kv": [ptr, i64, i64, ptr, ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr, i32, i32, i32],
            "rms_norm_heads": [ptr, i64, i64, i32, i32, i32, ptr, ptr, f32, i32, i32, i32],
            "silu_mul": [ptr, ptr, i64, i32, i32, i32],
            "lora_add": [ptr, i64, i32, ptr, i64, i32, ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, i64, ptr, i32, i32, i32],
            "argmax_rows": [ptr, i64, i64, i64, i32, ptr, i32],
            "apply_token_bitmask": [ptr, i64, i64, i64, ptr, i64],
            "amx_init": [],
            "amx_gemm_bf16": [ptr, i64, i64, i32, ptr, i32, ptr, ptr, i64, i32],
            "avx512_bf16_available": [],
            "avx512_bf16_gemm": [ptr, i64, i64, i32, ptr, i32, ptr, ptr, i64, i32],
            "decoder_layers": [ptr, i64, ptr],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
        _lib = lib
        return _lib


def paged_attention_short(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                          query_start: torch.Tensor, query_len: torch.Tensor, context_len: torch.Tensor,
                          block_table: torch.Tensor, block_size: int, scale: float, window: int | None = None,
                          softcap: float | None = None) -> None:
    """Native version of kernels.attention's short-query batch (see csrc/paged_attention.c).
    q [T, heads, d] (token rows may be strided, heads/d contiguous); caches [blocks, kv_heads, block_size, d];
    out [T, heads, d]; per-request int64 vectors; block_table [B, max_blocks] int64."""
    lib = library()
    heads, d = q.shape[1], q.shape[2]
    rc = lib.paged_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                             out.stride(0), int(query_start.shape[0]), query_start.data_ptr(), query_len.data_ptr(),
                             context_len.data_ptr(), block_table.data_ptr(), block_table.shape[1], heads,
                             k_cache.shape[1], d, block_size, scale, int(q.dtype == torch.bfloat16),
                             torch.get_num_threads(), window or 0, softcap or 0.0)
    if rc != 0:
        raise RuntimeError("paged attention kernel refused its arguments or could not allocate scratch memory")


# Limits of the C code (scratch rows on the stack): larger shapes take the torch path.
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 64
MAX_ROW_WIDTH = 16384
MAX_LORA_RANK = 256
MAX_LORA_IN = 32768


def supports(q: torch.Tensor, block_size: int) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and q.shape[2] <= MAX_HEAD_DIM
            and block_size <= MAX_BLOCK_SIZE and q.stride(2) == 1 and q.stride(1) == q.shape[2]
            and library() is not None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"native {what} kernel refused its arguments")


def rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    """weight in x's dtype (Llama: rounded before it) or fp32 (Gemma: rounded after it)."""
    rows, width = x.shape
    fp32_weight = weight.dtype == torch.float32 and x.dtype != torch.float32
    _check(library().rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                              out.data_ptr(), rows, width, eps, int(x.dtype == torch.bfloat16),
                              torch.get_num_threads(), int(fp32_weight)), "rms_norm")


def rms_norm_heads(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int, kv_heads: int,
                   d: int, eps: float) -> None:
    """weights in qkv's dtype (rounded before them) or fp32 (after them), like rms_norm."""
    fp32_weight = q_weight.dtype == torch.float32 and qkv.dtype != torch.float32
    _check(library().rms_norm_heads(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], heads, kv_heads, d,
                                    q_weight.data_ptr(), k_weight.data_ptr(), eps, int(qkv.dtype == torch.bfloat16),
                                    int(fp32_weight), torch.get_num_threads()), "rms_norm_heads")


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  kv_heads: int, d: int, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check(library().rope_write_kv(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], positions.data_ptr(), cos.data_ptr(),
                                   sin.data_ptr(), heads, kv_heads, d, cos.shape[1], slot_mapping.data_ptr(),
                                   k_cache.data_ptr(),
                                   v_cache.data_ptr(), k_cache.shape[2], int(qkv.dtype == torch.bfloat16),
                                   torch.get_num_threads()), "rope_write_kv")


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    _check(library().silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], out.shape[1],
                              int(gate_up.dtype == torch.bfloat16), torch.get_num_threads()), "silu_mul")


_amx: bool | None = None


def amx_available() -> bool:
    """Whether the AMX GEMM can run: kernels built for a CPU with AMX and the OS grants the tiles."""
    global _amx
    if _amx is None:
        lib = library()
        _amx = lib is not None and lib.amx_init() == 0
    return _amx


def tiled_gemm_kernel() -> str | None:
    """Which native GEMM runs bf16 weights packed in AMX tile order (kernels/dense.py,
    TiledWeight): "amx", else "avx512_bf16" (AVX-512 BF16's dot product, as on AMD Zen 4),
    else None."""
    if amx_available():
        return "amx"
    lib = library()
    return "avx512_bf16" if lib is not None and lib.avx512_bf16_available() == 0 else None


def tiled_gemm(kernel: str, x: torch.Tensor, tiles: torch.Tensor, out_features: int, bias: torch.Tensor | None,
               y: torch.Tensor) -> None:
    """y [M, N] = x [M, K] @ W.T (+ bias), bf16; tiles: W in the layout of csrc/amx_gemm.c,
    which csrc/avx512_bf16_gemm.c reads too."""
    fn = library().amx_gemm_bf16 if kernel == "amx" else library().avx512_bf16_gemm
    _check(fn(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], tiles.data_ptr(), out_features,
              None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), torch.get_num_threads()), kernel)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take these tensors (CPU, bf16/fp32, contiguous rows)."""
    if library() is None:
        return False
    for t in tensors:  # a plain loop: this runs for every kernel call of every step
        if t.dtype not in _DTYPES or t.device.type != "cpu" or t.stride(-1) != 1 or t.shape[-1] > MAX_ROW_WIDTH:
            return False
    return True


_DTYPES = (torch.bfloat16, torch.float32)


def lora_add(y: torch.Tensor, x: torch.Tensor, table: torch.Tensor, rank: int, seg_start: torch.Tensor,
             seg_len: torch.Tensor, seg_slot: torch.Tensor, amx: bool, row_scale: torch.Tensor | None = None,
             row_shift: torch.Tensor | None = None, seg_term_row: torch.Tensor | None = None) -> None:
    """y [T, *] (row stride allowed) += LoRA of the given segments (slot >= 0) for every module
    of `table` (int64 [modules, 7], see kernels.lora.LoraModules and csrc/lora.c): with the AMX
    kernel (bf16, shapes it fits; segments of any length) or the AVX-512 / plain one (segments
    of at most 64 rows). With seg_term_row (a row of the [rows, y's width] tables row_scale and
    row_shift per segment, -1: none), the modules' columns of those segments' rows then become
    y * s + t (csrc/lora.h, struct row_terms)."""
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    stride = next((t.stride(0) for t in (row_scale, row_shift) if t is not None), 0)
    _check(library().lora_add(x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0), table.shape[0],
                              table.data_ptr(), rank, seg_slot.shape[0], seg_start.data_ptr(), seg_len.data_ptr(),
                              seg_slot.data_ptr(), ptr(row_scale), ptr(row_shift), stride, ptr(seg_term_row),
                              int(x.dtype == torch.bfloat16), int(amx), torch.get_num_threads()),
           "lora_add")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum, int64 [rows]; x [rows, n] bf16/fp32 with contiguous rows."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _check(library().argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], int(x.dtype == torch.bfloat16),
                                 out.data_ptr(), torch.get_num_threads()), "argmax_rows")
    return out


def apply_token_bitmask(x: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: x [rows, n] fp32 (contiguous rows) gets -inf where mask [rows, words] int32
    (contiguous) has a 0 bit."""
    _check(library().apply_token_bitmask(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], mask.data_ptr(),
                                         mask.shape[1]), "apply_token_bitmask")
