"""Beam search: loragate vs Hugging Face transformers' generate(num_beams=...), side by side in
one process.

    python bench/beam_search.py [--model smollm2-135m-instruct] [--prompts 8] [--beams 4]
                                [--max-tokens 32] [--dtype bfloat16]

The same chat prompts, each searched with `--beams` beams for up to `--max-tokens` tokens:
loragate's LLM.beam_search runs every search at once (the engine batches their steps), and
transformers' generate runs them as one padded batch (left padding). loragate runs twice:
as it is, where each step's request copies its beam's last partial K/V block kept by the
cache (engine/kv_cache.py), and with that off, where it computes those rows again. Prints
the wall time and computed tokens of each, the ratios, and how many of the returned
hypotheses are token-identical to transformers' (all of them in float32; in bf16 sums in
other orders can flip near-ties). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from loragate.engine import LLM, BeamSearchParams
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

QUESTIONS = ["Translate to French: the weather is nice today.", "What is the capital of Germany?",
             "Write a haiku about the sea.", "Give me a Python function that reverses a string.",
             "Name three primary colors.", "Summarize the plot of Hamlet in one sentence.",
             "What does HTTP stand for?", "Suggest a name for a bakery."]


def hf_beams(model, tokenizer, prompts: list[list[int]], params: BeamSearchParams, eos: list[int]):
    """transformers' hypotheses for every prompt, as one left-padded batch: (seconds, per prompt
    its beam_width token lists, cut after the stop token)."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=params.max_tokens, num_beams=params.beam_width,
                         num_return_sequences=params.beam_width, do_sample=False, eos_token_id=eos,
                         pad_token_id=pad)
    seconds = time.perf_counter() - t0
    rows = []
    for row in out[:, width:].tolist():
        ends = [j for j, t in enumerate(row) if t in eos]
        rows.append(row[:ends[0] + 1] if ends else row)
    return seconds, [rows[i:i + params.beam_width] for i in range(0, len(rows), params.beam_width)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=8, help=f"how many searches (at most {len(QUESTIONS)})")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    if not 1 <= args.prompts <= len(QUESTIONS):
        ap.error(f"--prompts must be between 1 and {len(QUESTIONS)}")

    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(args.model)
    llm = LLM(str(model_dir), dtype=args.dtype, progress=False)
    recomputing = LLM(str(model_dir), dtype=args.dtype, progress=False)  # a cache of its own
    recomputing.engine.kv.copy_rows = None  # keeps no partial blocks: a step computes their rows again
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS[:args.prompts]]
    params = BeamSearchParams(beam_width=args.beams, max_tokens=args.max_tokens)
    eos = sorted(llm.engine.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    warm_up = [tok.encode("Hello")]
    hf_beams(hf, tok, warm_up, BeamSearchParams(beam_width=2, max_tokens=2), eos)
    for engine in (llm, recomputing):
        engine.beam_search(warm_up, BeamSearchParams(beam_width=2, max_tokens=2))

    ours_s, ours_tokens, ours = timed_search(llm, prompts, params)
    again_s, again_tokens, _ = timed_search(recomputing, prompts, params)
    hf_s, theirs = hf_beams(hf, tok, prompts, params, eos)
    same = sum(s.token_ids == t for mine, hf_rows in zip(ours, theirs) for s, t in zip(mine, hf_rows))

    total = len(prompts) * args.beams
    print(f"{len(prompts)} searches x {args.beams} beams, up to {args.max_tokens} tokens, {args.model} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"  loragate                          {ours_s:6.2f} s   {ours_tokens:6d} tokens computed")
    print(f"  loragate, partial blocks again    {again_s:6.2f} s   {again_tokens:6d} tokens computed")
    print(f"  transformers generate             {hf_s:6.2f} s   (one padded batch)")
    print(f"loragate vs transformers: {hf_s / ours_s:.2f}x; vs computing partial blocks again: {again_s / ours_s:.2f}x; "
          f"hypotheses identical to transformers' {same}/{total}")


def timed_search(llm: LLM, prompts: list[list[int]], params: BeamSearchParams):
    """(seconds, tokens the model computed, hypotheses) of one batched search."""
    before = llm.engine.num_computed_tokens_total
    t0 = time.perf_counter()
    out = llm.beam_search(prompts, params)
    return time.perf_counter() - t0, llm.engine.num_computed_tokens_total - before, out


if __name__ == "__main__":
    main()
