"""The engine on a CUDA GPU (EngineConfig.device) against the same engine on the CPU: model,
paged KV cache with prefix hits and chunked prefill, LoRA slots (the torch path in fp32,
flashinfer's segment GEMM in bf16), DoRA and lora_bias row terms, speculative decoding.
Those skip without a CUDA GPU; the device setting and the batch's move to a device are
checked everywhere. Where there is a GPU, the rest of the suite runs on it too (device
'auto'), against peft and transformers on the CPU."""

from __future__ import annotations

import pytest
import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.errors import ModelConfigError
from loragate.kernels import lora_cuda

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
needs_flashinfer = pytest.mark.skipif(lora_cuda._flashinfer() is None, reason="flashinfer is not installed")

# name -> (rank, alpha, target modules, use_dora, lora_bias)
ADAPTERS = {
    "lora": (8, 16, "all-linear", False, False),
    "dora": (4, 8, ["q_proj", "v_proj", "gate_proj", "down_proj"], True, False),
    "bias": (16, 16, ["k_proj", "o_proj", "up_proj"], False, True),
}


def test_the_device_setting_is_checked_and_auto_picks_the_gpu_when_there_is_one():
    with pytest.raises(ModelConfigError, match="device must be"):
        EngineConfig(device="tpu")
    with pytest.raises(ModelConfigError, match="device must be"):
        EngineConfig(device="cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="sees no CUDA GPU"):
            EngineConfig(device="cuda")
    else:
        with pytest.raises(ModelConfigError, match="CUDA GPU"):
            EngineConfig(device=f"cuda:{torch.cuda.device_count()}")
    assert EngineConfig(device="cpu").torch_device == torch.device("cpu")
    assert EngineConfig().torch_device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model, tmp_path_factory, save_lora):
    root = tmp_path_factory.mktemp("cuda-adapters")
    return {name: save_lora(tiny_model, root / name, 0.5 / r ** 0.5, seed=40 + i, r=r, lora_alpha=alpha,
                            target_modules=targets, use_dora=dora, lora_bias=bias, lora_dropout=0.0,
                            task_type="CAUSAL_LM")
            for i, (name, (r, alpha, targets, dora, bias)) in enumerate(ADAPTERS.items())}


def workload(vocab: int) -> list[tuple[list[int], str | None, SamplingParams]]:
    """Base and adapter requests; short and long prompts (decode batch and prefill spans),
    two sharing a 40-token prefix (a prefix-cache hit), one sampled with a seed."""
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, vocab, (40,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    out = []
    for i, adapter in enumerate(["lora", None, "dora", "bias", "lora", None, "dora"]):
        n = [5, 90, 23, 3, 140, 17, 60][i]
        out.append((torch.randint(3, vocab, (n,), generator=g).tolist(), adapter, greedy))
    out.append((prefix + [5, 6, 7], "bias", greedy))
    out.append((prefix + [9, 10], "bias", greedy))
    out.append(([4, 8, 15, 16, 23, 42], "lora", SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True)))
    return out


def run(model_dir, adapter_dirs, device: str, dtype: str, **config) -> list[tuple]:
    """Per request: (tokens, their logprobs, prompt logprobs)."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, dtype=dtype, max_loras=2,
                                    max_num_batched_tokens=96, **config), progress=False)
    assert engine.model.device.type == torch.device(device).type
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    reqs = [engine.add_request(p, params, adapter=a) for p, a, params in workload(engine.model.config.vocab_size)]
    prompt_logprobs = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                prompt_logprobs[out.request_id] = [lp for lp, _, _ in out.prompt_logprobs or []]
    assert engine.lora_pool.num_pinned == 0 and engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.lora_pool.stats.evictions > 0  # 3 adapters in 2 slots: loads onto the GPU mid-run
    return [(r.output_token_ids, [lp for lp, _ in r.logprobs or []], prompt_logprobs[r.request_id]) for r in reqs]


@needs_gpu
def test_fp32_engine_on_the_gpu_matches_the_engine_on_the_cpu(tiny_model, adapter_dirs):
    gpu = run(tiny_model, adapter_dirs, "cuda", "float32")
    cpu = run(tiny_model, adapter_dirs, "cpu", "float32")
    for i, ((g_tokens, g_lp, g_prompt), (c_tokens, c_lp, c_prompt)) in enumerate(zip(gpu, cpu)):
        assert g_tokens == c_tokens, f"request {i} diverged"
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(c_lp), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(g_prompt), torch.tensor(c_prompt), atol=1e-4, rtol=0)


@needs_gpu
@needs_flashinfer
def test_bf16_engine_on_the_gpu_runs_lora_through_flashinfer_and_matches_fp32(tiny_model, adapter_dirs, monkeypatch):
    """bf16 takes flashinfer's segment GEMM; its prompt log-probs (every position of every
    prompt, each through its adapter) stay within bf16's error of the fp32 CPU engine's."""
    calls = []
    real = lora_cuda.add_lora_modules
    monkeypatch.setattr(lora_cuda, "add_lora_modules", lambda *a: calls.append(1) or real(*a))
    gpu = run(tiny_model, adapter_dirs, "cuda", "bfloat16")
    assert calls, "the segment GEMM never ran"
    cpu = run(tiny_model, adapter_dirs, "cpu", "float32")
    worst = max((torch.tensor(g[2]) - torch.tensor(c[2])).abs().max().item() for g, c in zip(gpu[:-1], cpu[:-1]))
    print(f"largest prompt logprob difference, bf16 GPU vs fp32 CPU: {worst:.4f}")
    assert worst < 0.15
    first_tokens_equal = sum(g[0][0] == c[0][0] for g, c in zip(gpu[:-1], cpu[:-1]))
    assert first_tokens_equal >= len(gpu) - 2


@needs_gpu
@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculative_decoding_on_the_gpu_is_lossless(tiny_model, adapter_dirs, speculative):
    draft = {"draft_model": str(tiny_model), "draft_quantization": "none"} if speculative == "draft" else {}
    plain = run(tiny_model, adapter_dirs, "cuda", "float32")
    spec = run(tiny_model, adapter_dirs, "cuda", "float32", speculative=speculative, **draft)
    for i, (p, s) in enumerate(zip(plain[:-1], spec[:-1])):  # greedy ones
        assert p[0] == s[0], f"request {i} diverged under {speculative} speculation"


def test_a_step_batch_moves_every_index_tensor_it_holds(tiny_llama, save_lora, tmp_path, monkeypatch):
    """Runs everywhere: BatchMetadata.to() onto torch's 'meta' device leaves no tensor behind on
    the host but the LoRA plan (which the kernels copy once per step themselves), for the batches
    of a run with decodes, a chunked prefill and a DoRA adapter's per-row scales."""
    from loragate.engine import model_runner
    from loragate.kernels.lora import LoraPlan

    batches = []
    real = model_runner.build_batch
    monkeypatch.setattr(model_runner, "build_batch", lambda *a, **k: batches.append(real(*a, **k)) or batches[-1])
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_num_batched_tokens=64),
                       progress=False)
    engine.add_adapter("d", save_lora(tiny_llama, tmp_path / "d", 0.3, seed=1, r=4, lora_alpha=8, use_dora=True,
                                      target_modules=["q_proj", "down_proj"]))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(list(range(3, 103)), params, adapter="d")
    engine.add_request([5, 6, 7], params, adapter="d")
    while engine.has_unfinished:
        engine.step()

    def host_tensors(value, path):
        if isinstance(value, torch.Tensor):
            return [path] if value.device.type != "meta" else []
        if isinstance(value, LoraPlan) or not hasattr(value, "__dataclass_fields__"):
            return [path] if isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value) else []
        return [p for name in value.__dataclass_fields__ for p in host_tensors(getattr(value, name), f"{path}.{name}")]

    seen = set()
    for batch in batches:
        moved = batch.to(torch.device("meta"))
        assert host_tensors(moved, "batch") == []
        assert all(host_tensors(s, "span") == [] for s in moved.attention.prefill_spans)
        seen |= {"context_slots"} if any(s.context_slots is not None for s in batch.attention.prefill_spans) else set()
        seen |= {"row_term_slots"} if batch.lora is not None and batch.lora.row_term_slots is not None else set()
        seen |= {"block_table"} if batch.attention.block_table is not None else set()
    assert seen == {"context_slots", "row_term_slots", "block_table"}  # the run reached every kind
