"""Engine vs Hugging Face transformers `generate`, side by side in one process.

    python bench/engine.py [--model smollm2-135m-instruct] [--device auto|cpu|cuda]

(a) batch-1 greedy decode tok/s (bf16; fp32 too, for the dtype default);
(b) 16 concurrent requests, prompts 32-512 and outputs 32-256 tokens: useful output tok/s
    (HF: one static left-padded batch that runs to the longest output);
(c) time to first token of a request whose 512-token prefix is in the prefix cache vs not.
Prints each figure and the ratio to its target. Both systems run on --device (HF's model is
moved there). On CUDA, (a) and (b) also run with CUDA graphs off, for their speed-up. Run it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
import time

import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

def token_pool(tokenizer, n: int, offset: int = 0) -> list[int]:
    """n tokens of real, non-repeating text (the standard library's argparse source), so no
    prompt shares a prefix with another by accident and the prefix cache only hits where a
    measurement means it to."""
    import argparse as source

    ids = tokenizer.encode(inspect.getsource(source))
    return ids[offset:offset + n]


def run_to_completion(engine: LLMEngine, prompts, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
    n = 0
    while engine.has_unfinished:
        n += len(engine.step())
    return time.perf_counter() - t0, n


def ours_decode(engine: LLMEngine, prompt, n_out: int) -> float:
    sp = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
    run_to_completion(engine, [prompt], [SamplingParams(max_tokens=4, temperature=0)])  # warm-up
    best = 0.0
    for _ in range(2):
        dt, n = run_to_completion(engine, [prompt], [sp])
        best = max(best, n / dt)
    return best


def hf_decode(hf, prompt, n_out: int) -> float:
    ids = torch.tensor([prompt], device=hf.device)
    hf.generate(ids, max_new_tokens=4, do_sample=False)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False).tolist()
        best = max(best, n_out / (time.perf_counter() - t0))
    return best


def hf_static_batch(hf, tokenizer, prompts, out_lens) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(out_lens), min_new_tokens=max(out_lens),
                    do_sample=False, pad_token_id=pad).tolist()
    return sum(out_lens) / (time.perf_counter() - t0)


def ttft(engine: LLMEngine, prompt) -> float:
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished:
        engine.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-fp32", action="store_true", help="skip the fp32 comparison runs")
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(args.model)
    rows: list[tuple[str, float, float, float]] = []  # (what, ours, baseline, target ratio)
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", device=args.device))
    tok = engine.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(engine.device)
    torch.set_num_threads(engine.config.num_threads or torch.get_num_threads())
    print(f"device: {engine.device}, threads: {torch.get_num_threads()}")

    prompt = token_pool(tok, 64)
    ours_a = ours_decode(engine, prompt, args.decode_tokens)
    hf_a = hf_decode(hf, prompt, args.decode_tokens)
    rows.append(("(a) batch-1 greedy decode tok/s, bf16", ours_a, hf_a, 1.5))
    print(f"(a) ours {ours_a:.1f} tok/s, HF {hf_a:.1f} tok/s", flush=True)

    rng = random.Random(0)
    prompt_lens = [rng.randint(32, 512) for _ in range(16)]
    out_lens = [rng.randint(32, 256) for _ in range(16)]
    prompts = [token_pool(tok, n, offset=1000 + 600 * i) for i, n in enumerate(prompt_lens)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    if engine.device.type == "cuda":  # capture the CUDA graphs of these shapes outside the measurement
        run_to_completion(engine, [token_pool(tok, n, offset=1001 + 600 * i) for i, n in enumerate(prompt_lens)],
                          params)
    dt, _ = run_to_completion(engine, prompts, params)
    ours_b = sum(out_lens) / dt
    hf_b = hf_static_batch(hf, tok, prompts, out_lens)
    rows.append(("(b) 16 concurrent mixed requests, output tok/s", ours_b, hf_b, 3.0))
    print(f"(b) ours {ours_b:.1f} tok/s, HF static batch {hf_b:.1f} tok/s", flush=True)

    # (c): fresh 512-token prefixes, each followed by two different 16-token suffixes.
    cold, warm = [], []
    for trial in range(3):
        prefix = token_pool(tok, 512, offset=12000 + 700 * trial)
        cold.append(ttft(engine, prefix + token_pool(tok, 16, offset=20000)))
        warm.append(ttft(engine, prefix + token_pool(tok, 16, offset=20100)))
    c_cold, c_warm = statistics.median(cold), statistics.median(warm)
    rows.append(("(c) TTFT speed-up, 512-token prefix cached vs not", c_cold / c_warm, 1.0, 5.0))
    print(f"(c) TTFT uncached {c_cold * 1e3:.0f} ms, cached {c_warm * 1e3:.0f} ms", flush=True)

    if engine.device.type == "cuda":
        eager = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", device=args.device, cuda_graphs=False),
                          progress=False)
        eager_a = ours_decode(eager, prompt, args.decode_tokens)
        eager_b = sum(out_lens) / run_to_completion(eager, prompts, params)[0]
        del eager
        print(f"CUDA graphs vs eager steps: batch-1 {ours_a:.1f} vs {eager_a:.1f} tok/s ({ours_a / eager_a:.2f}x); "
              f"16 concurrent {ours_b:.1f} vs {eager_b:.1f} tok/s ({ours_b / eager_b:.2f}x)", flush=True)

    if not args.skip_fp32:
        del hf
        e32 = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device=args.device), progress=False)
        f32_a = ours_decode(e32, prompt, args.decode_tokens)
        dt, _ = run_to_completion(e32, prompts, params)
        print(f"dtype: batch-1 decode bf16 {ours_a:.1f} vs fp32 {f32_a:.1f} tok/s; "
              f"16 concurrent bf16 {ours_b:.1f} vs fp32 {sum(out_lens) / dt:.1f} tok/s")

    print("\n| measure | ours | baseline | ratio | target |\n|---|---|---|---|---|")
    for what, ours, base, target in rows:
        ratio = ours / base
        print(f"| {what} | {ours:.1f} | {base:.1f} | {ratio:.2f}x | >= {target}x {'ok' if ratio >= target else 'MISSED'} |")


if __name__ == "__main__":
    main()
