"""Predicted outputs (OpenAI's `prediction`) vs none, side by side in one engine.

    python bench/predicted_outputs.py [--model smollm2-135m-instruct] [--max-tokens 384] [--rounds 2]

Code-editing chat requests (greedy): "make this small change and return the whole file",
with a ~330-token Python file. Each runs without a prediction, with the original file as
the prediction (what a client knows), and with the answer itself (the best case). One
request alone, then 8 at once (each its own edit). Alone, the outputs are checked to be the
same tokens. At 8, a step's rows decide how bf16 rounds (from 128 rows the projections take
oneDNN's kernel, not the AMX one), so answers may part at a near-tie: the script counts
those that are the same. Modes alternate over --rounds rounds (this machine's memory
bandwidth drifts over minutes); the best round counts.
"""

from __future__ import annotations

import argparse
import time

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.prepare import DEFAULT_MODEL

CODE = '''import json
from pathlib import Path


def load_orders(path):
    """Read the orders file: one JSON object per line."""
    orders = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                orders.append(json.loads(line))
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        customer = order["customer"]
        amount = order["quantity"] * order["price"]
        totals[customer] = totals.get(customer, 0) + amount
    return totals


def top_customers(totals, count=5):
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)
    return ranked[:count]


def main():
    orders = load_orders(Path("orders.jsonl"))
    totals = total_by_customer(orders)
    for customer, total in top_customers(totals):
        print(f"{customer}: {total:.2f}")


if __name__ == "__main__":
    main()
'''
EDITS = ["Rename the function `load_orders` to `read_orders`.", "Rename the variable `totals` to `sums`.",
         "Change the default `count` from 5 to 10.", "Rename `top_customers` to `best_customers`.",
         "Rename the variable `amount` to `value`.", "Print the totals with three decimals instead of two.",
         "Rename the variable `ranked` to `ordered`.", "Rename the parameter `path` to `filename`."]


def prompt_ids(engine: LLMEngine, edit: str) -> list[int]:
    messages = [{"role": "user", "content": f"{edit} Return the whole file, changed, in a python code block.\n\n"
                                            f"```python\n{CODE}```"}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)


def run(engine: LLMEngine, prompts, max_tokens: int, predictions) -> tuple[list[list[int]], float, int, int]:
    """(outputs, seconds, engine steps, accepted prediction tokens)."""
    reqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, prediction=pred))
            for p, pred in zip(prompts, predictions)]
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        steps += 1
    seconds = time.perf_counter() - t0
    return [r.output_token_ids for r in reqs], seconds, steps, sum(r.num_accepted_prediction_tokens for r in reqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16", enable_prefix_caching=False))
    for n in (1, 8):
        prompts = [prompt_ids(engine, edit) for edit in EDITS[:n]]
        plain, _, _, _ = run(engine, prompts, args.max_tokens, [None] * n)  # warm-up, and the answers
        answers = [engine.tokenizer.decode(o) for o in plain]
        modes = {"no prediction": [None] * n, "the original file": [CODE] * n, "the answer itself": answers}
        best: dict[str, tuple] = {}
        for _ in range(args.rounds):
            for name, predictions in modes.items():
                outputs, seconds, steps, accepted = run(engine, prompts, args.max_tokens, predictions)
                same = sum(o == p for o, p in zip(outputs, plain))
                if n == 1 and not same:
                    raise SystemExit(f"{name}: the output differs from the one without a prediction")
                tokens = sum(map(len, outputs))
                if name not in best or tokens / seconds > best[name][0]:
                    best[name] = (tokens / seconds, steps, accepted, tokens, same)
        base = best["no prediction"][0]
        for name, (tps, steps, accepted, tokens, same) in best.items():
            print(f"{n} request(s), prediction = {name:18s}: {tps:7.1f} tok/s ({tps / base:.2f}x), {steps} steps, "
                  f"{accepted} of {tokens} tokens accepted from the prediction, {same} of {n} answers as without",
                  flush=True)


if __name__ == "__main__":
    main()
