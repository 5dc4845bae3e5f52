"""Speculative decoding vs plain decoding vs Hugging Face, side by side in one process.

    python bench/speculative.py [--target qwen2.5-coder-1.5b-instruct]
                                [--draft qwen2.5-coder-0.5b-instruct] [--max-tokens 128]
                                [--concurrent 8] [--rounds 2] [--concurrent-only]

Greedy, batch 1, on three tasks (writing code, writing prose, editing a given code file):
tok/s of ours plain, ours + draft model, ours + n-gram lookup, HF `generate` and HF assisted
generation (`assistant_model=`), with our acceptance rate and mean accepted length; then 8
requests in flight (refilled from a queue), plain vs speculative, on one target engine in
alternating rounds. Prints the ratios against the targets. All systems run bf16 on the same
threads; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import time

import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.prepare import resolve_model
from loragate.engine.spec.speculator import build_speculator

TASKS = {
    "code": "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals, "
            "with a docstring and type hints, followed by three unit tests using pytest.",
    "prose": "Write a short, vivid story (three paragraphs) about a lighthouse keeper who finds a "
             "message in a bottle.",
}


def edit_task() -> str:
    """An input-grounded task: return a given code file with a small change."""
    import textwrap as source

    code = inspect.getsource(source.TextWrapper._split)
    code += inspect.getsource(source.TextWrapper._fix_sentence_endings)
    return ("Here is a Python file:\n```python\n" + code + "```\nRename the variable `chunks` to `pieces` "
            "everywhere and return the complete updated file, with no explanation.")


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def ours(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    reqs = [engine.add_request(p, params) for p in prompts]
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    dt = time.perf_counter() - t0
    return sum(len(r.output_token_ids) for r in reqs) / dt, [r.output_token_ids for r in reqs]


def hf(model, prompt: list[int], max_tokens: int, assistant=None) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             **kwargs)
    dt = time.perf_counter() - t0
    new = out[0, len(prompt):].tolist()
    return len(new) / dt, new


def make_engine(target: str, mode: str, draft: str, k: int, max_num_seqs: int = 32) -> LLMEngine:
    extra = {"draft_model": draft} if mode == "draft" else {}
    return LLMEngine(EngineConfig(model=target, speculative=mode, num_speculative_tokens=k, max_loras=0,
                                  kv_cache_memory="2GiB", max_num_seqs=max_num_seqs, **extra), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=6)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the concurrent measurement")
    ap.add_argument("--concurrent-only", action="store_true", help="skip the batch-1 comparison")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from transformers import AutoTokenizer

    target_dir, draft_dir = resolve_model(args.target), resolve_model(args.draft)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    tasks = {name: chat_ids(tok, text) for name, text in {**TASKS, "edit": edit_task()}.items()}
    if not args.concurrent_only:
        batch_one(args, tasks, target_dir, draft_dir)
    concurrent(args, tasks)


def batch_one(args, tasks: dict[str, list[int]], target_dir, draft_dir) -> None:
    from transformers import AutoModelForCausalLM

    n = args.max_tokens
    results: dict[str, dict[str, float]] = {t: {} for t in tasks}
    outputs: dict[tuple[str, str], list[int]] = {}
    accept: dict[tuple[str, str], tuple[float, float]] = {}

    for mode in ("off", "draft", "ngram"):
        engine = make_engine(args.target, mode, args.draft, args.num_speculative_tokens)
        ours(engine, [tasks["code"][:64]], 8)  # warm-up: native kernels, first allocations
        for task, ids in tasks.items():
            if engine.speculator is not None:
                engine.speculator.stats.__init__()
            rate, outs = ours(engine, [ids], n)
            results[task][f"ours {mode}"] = rate
            outputs[(task, mode)] = outs[0]
            if engine.speculator is not None:
                s = engine.speculator.stats
                accept[(task, mode)] = (s.acceptance_rate, s.mean_accepted_length)
            print(f"  ours {mode:5s} {task:5s} {rate:6.2f} tok/s", flush=True)
        del engine

    hf_target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.bfloat16).eval()
    hf(hf_target, tasks["code"][:64], 4)
    hf(hf_target, tasks["code"][:64], 4, hf_draft)
    for task, ids in tasks.items():
        results[task]["HF generate"], _ = hf(hf_target, ids, n)
        results[task]["HF assisted"], _ = hf(hf_target, ids, n, hf_draft)
        print(f"  HF {task:5s} {results[task]['HF generate']:6.2f} / assisted {results[task]['HF assisted']:6.2f} tok/s",
              flush=True)
    del hf_target, hf_draft

    print(f"\nbatch 1, greedy, {n} new tokens at most, tok/s (same greedy tokens: ours spec == ours plain)")
    systems = ["ours off", "ours draft", "ours ngram", "HF generate", "HF assisted"]
    print(f"{'task':6s} " + " ".join(f"{s:>12s}" for s in systems) + "   accept/len draft   accept/len ngram   same")
    for task in tasks:
        row = results[task]
        same = all(outputs[(task, m)] == outputs[(task, "off")] for m in ("draft", "ngram"))
        a_d, a_n = accept[(task, "draft")], accept[(task, "ngram")]
        print(f"{task:6s} " + " ".join(f"{row[s]:12.2f}" for s in systems)
              + f"   {a_d[0]:.2f} / {a_d[1]:.2f}        {a_n[0]:.2f} / {a_n[1]:.2f}        {same}")
    code, edit = results["code"], results["edit"]
    print(f"\nours+draft / ours plain on code: {code['ours draft'] / code['ours off']:.2f}x (target 2.0x)")
    print(f"ours+draft / HF assisted on code: {code['ours draft'] / code['HF assisted']:.2f}x (target 1.5x)")
    print(f"ours+ngram / ours plain on edit:  {edit['ours ngram'] / edit['ours off']:.2f}x (target 1.5x)")


def concurrent(args, tasks: dict[str, list[int]]) -> None:
    n = args.max_tokens
    # A busy server: `concurrent` requests in flight all the time (max_num_seqs), refilled from a
    # queue of 3x as many as they finish, so the figure is steady-state throughput rather than
    # how long the slowest of one fixed batch takes. One target engine serves all three modes
    # (its speculator swapped between runs), in alternating rounds: this machine's memory
    # bandwidth drifts by several percent over minutes, as much as the effect measured.
    queue = [list(tasks.values())[i % len(tasks)] for i in range(3 * args.concurrent)]
    print(f"\n{args.concurrent} concurrent requests (mixed tasks; {len(queue)} queued, {args.concurrent} in flight; "
          f"{args.rounds} alternating rounds after a warm-up pass), total tok/s:")
    engine = make_engine(args.target, "off", args.draft, args.num_speculative_tokens, args.concurrent)
    modes = {"off": None}
    for mode in ("draft", "ngram"):
        config = dataclasses.replace(engine.config, speculative=mode, draft_model=args.draft)
        modes[mode] = build_speculator(config, engine)
    for speculator in modes.values():
        engine.speculator = speculator
        ours(engine, queue[: args.concurrent], n)
    tokens = {mode: 0 for mode in modes}
    seconds = {mode: 0.0 for mode in modes}
    for r in range(args.rounds):
        for mode, speculator in modes.items():
            engine.speculator = speculator
            rate, outs = ours(engine, queue, n)
            count = sum(map(len, outs))
            tokens[mode] += count
            seconds[mode] += count / rate
            print(f"  round {r + 1} {mode:5s} {rate:6.2f}", flush=True)
    rates = {mode: tokens[mode] / seconds[mode] for mode in modes}
    print("  all rounds: " + ", ".join(f"{mode} {rate:.2f}" for mode, rate in rates.items()))
    for mode in ("draft", "ngram"):
        print(f"{mode} / plain at {args.concurrent} concurrent: {rates[mode] / rates['off']:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
