"""EngineConfig: every engine knob in one validated dataclass (CLI flags and LORAGATE_*
environment variables map onto these fields)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from .errors import ModelConfigError

SPECULATIVE_MODES = ("off", "draft", "ngram")
DRAFT_QUANTIZATIONS = ("int4", "none")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def parse_bytes(value: str | int, name: str = "size") -> int:
    """'2GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ModelConfigError(f"{name}: cannot parse a size from {value!r} (examples: 512MiB, 2GiB)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


def parse_share(value: str | int | float, name: str) -> int | float:
    """'85%' -> 0.85 (a share of free memory); any size parse_bytes takes -> bytes."""
    if isinstance(value, float) or (isinstance(value, str) and value.strip().endswith("%")):
        try:
            share = value if isinstance(value, float) else float(value.strip()[:-1]) / 100
        except ValueError:
            share = float("nan")
        if not math.isfinite(share):
            raise ModelConfigError(f"{name}: cannot parse a share from {value!r} (examples: 85%, 2GiB)")
        return share
    return parse_bytes(value, name)


def free_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ModelConfigError("cannot tell this host's free memory (no /proc/meminfo): give kv_cache_memory as a size")


def physical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"  # a catalog name (see `loragate models list`) or a model directory
    # auto: the first CUDA GPU torch sees, else the CPU. On CUDA the model, KV cache and LoRA
    # slots live on the GPU and LoRA segments run through flashinfer's segment GEMM.
    device: str = "auto"
    # bfloat16 is the default: on CPUs with AMX/AVX-512-BF16 it moves half the bytes of fp32
    # per decoded token, and decode is memory-bound (README's benchmark table).
    dtype: str = "bfloat16"
    # On CUDA, decode and speculative verification steps replay CUDA graphs (engine/cuda_graphs.py):
    # a small model's step is otherwise bound by kernel launches. False: every step runs eagerly.
    cuda_graphs: bool = True
    # default: the model's max_position_embeddings (a LongRoPE model's original_max_position_embeddings;
    # more serves its long factors at every position: arch.py's LONGROPE), capped by the KV cache
    max_model_len: int | None = None
    block_size: int = 16
    # A size ("1GiB"), or a share of the memory free once the model and LoRA slots are loaded
    # ("85%": of the GPU's on CUDA, of MemAvailable on CPU); the rest is for activations (and
    # a draft model). Parsed to bytes (int) or a fraction (float).
    kv_cache_memory: int | float | str = "1GiB"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; default: the cores this process may use
    max_loras: int = 4  # LoRA slots (distinct adapters per step); 0 disables LoRA support
    max_lora_rank: int = 64
    max_cpu_loras: int = 32  # adapters kept in host memory after eviction from a slot
    # Host memory for adapters' weights, in each of the places that keep them (adapters/host_lru.py)
    max_cpu_lora_memory: int | str = "8GiB"
    speculative: str = "off"  # off | draft (needs draft_model) | ngram (prompt lookup)
    draft_model: str | None = None  # catalog name or model directory; same tokenizer as the model
    num_speculative_tokens: int = 4  # most tokens proposed per request and step (adapted per request)
    # The draft proposes among the lowest token ids plus each request's own tokens (0: all);
    # its output head is a large part of a small model's bytes (engine/spec/draft_head.py).
    draft_vocab_size: int = 32768
    # int4: the draft's weights are quantized (weight-only, per group of 32), so a drafted
    # token reads about a quarter of the bytes; lossless all the same, since the target
    # verifies every proposal.
    draft_quantization: str = "int4"
    ngram_min: int = 2  # n-gram prompt lookup: shortest and longest suffix to match
    ngram_max: int = 4

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ModelConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ModelConfigError(f"device {self.device!r}: torch sees no CUDA GPU (this torch build: "
                                       f"{torch.__version__}; a CPU-only build never does)")
            index = torch.device(self.device).index
            if index is not None and index >= torch.cuda.device_count():
                raise ModelConfigError(f"device {self.device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        if self.dtype not in DTYPES:
            raise ModelConfigError(f"dtype must be one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        self.kv_cache_memory = parse_share(self.kv_cache_memory, "kv_cache_memory")
        self.max_cpu_lora_memory = parse_bytes(self.max_cpu_lora_memory, "max_cpu_lora_memory")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ModelConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ModelConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        for name in ("max_loras", "max_cpu_loras", "max_cpu_lora_memory"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_lora_rank < 1:
            raise ModelConfigError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.speculative not in SPECULATIVE_MODES:
            raise ModelConfigError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {self.speculative!r}")
        if self.speculative == "draft" and not self.draft_model:
            raise ModelConfigError("speculative 'draft' needs a draft model (--draft-model NAME_OR_DIR)")
        if not 1 <= self.num_speculative_tokens <= 15:
            raise ModelConfigError(f"num_speculative_tokens must be in 1..15, got {self.num_speculative_tokens}")
        if self.draft_vocab_size < 0:
            raise ModelConfigError(f"draft_vocab_size must be >= 0 (0: the whole vocabulary), got {self.draft_vocab_size}")
        if self.draft_quantization not in DRAFT_QUANTIZATIONS:
            raise ModelConfigError(f"draft_quantization must be one of {', '.join(DRAFT_QUANTIZATIONS)}, "
                                   f"got {self.draft_quantization!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ModelConfigError(f"n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.kv_cache_memory <= 0:
            raise ModelConfigError("kv_cache_memory must be positive")
        if isinstance(self.kv_cache_memory, float) and self.kv_cache_memory > 0.95:
            raise ModelConfigError("kv_cache_memory as a share of free memory must be at most 95%: "
                                   "activations need the rest")

    def kv_cache_bytes(self, device: torch.device) -> int:
        """The KV cache budget: the size given, or the share of `device`'s free memory now."""
        if isinstance(self.kv_cache_memory, float):
            return int(self.kv_cache_memory * free_memory(device))
        return self.kv_cache_memory

    @property
    def cuda_graph_rows(self) -> int:
        """Most tokens in a step replayed as a CUDA graph (0: none): a token per running
        request, plus its proposals when speculating."""
        if not self.cuda_graphs:
            return 0
        per_request = 1 + (self.num_speculative_tokens if self.speculative != "off" else 0)
        return min(self.max_num_seqs * per_request, self.max_num_batched_tokens)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The device with its index (cuda: the current GPU), so kernels can be launched on it."""
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
