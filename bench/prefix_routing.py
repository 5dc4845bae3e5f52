"""Cache-aware routing: multi-turn conversations on the base model through a router over two
engines, with prefix routing on, off, and round-robin, side by side in one run.

    python bench/prefix_routing.py [--conversations 32] [--turns 6] [--clients 16] [--max-tokens 32]

Each run starts two `loragate serve --role engine` replicas (SmolLM2-135M-Instruct bf16,
--num-threads 1 each) and a router with the policy. --clients conversations go on at once;
each plays its turns: every request sends the whole history so far (a shared system prompt,
the earlier questions, the answers the server gave) plus a new question, greedy with
ignore_eos, after a think time (--think) since the last answer. Without one, an engine that
just finished a turn is the least loaded at the moment the same client sends its next turn,
so plain least-loaded routing would look like session affinity, which real users' pauses
do not give it. The same conversations run under each policy, on fresh engines.
Before the count, 40 one-token requests through the router make the base model a hot key, as
it is in steady traffic (gateway/key_shares.py), so it gets both engines. Prints output tok/s,
the share of prompt tokens served from the prefix cache (usage.prompt_tokens_details), the
mean request latency, and the ratios against prefix routing off and round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from router import AUTH, KEY, Fleet  # noqa: E402

from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402

RUNS = (("prefix routing", "affinity", ("--prefix-routing", "true")),
        ("no prefix routing", "affinity", ("--prefix-routing", "false")),
        ("round-robin", "round_robin", ()))


def conversations(n: int, turns: int, seed: int) -> tuple[str, list[list[str]]]:
    """A system prompt and, per conversation, its questions: passages of a long text."""
    import argparse as source

    words = inspect.getsource(source).split()
    rng = random.Random(seed)

    def passage(length: int) -> str:
        at = rng.randrange(len(words) - length)
        return " ".join(words[at:at + length])

    system = "You review Python code. Answer briefly and precisely. Context: " + passage(120)
    return system, [[f"Question {t + 1}: what does this do? {passage(rng.randint(40, 80))}" for t in range(turns)]
                    for _ in range(n)]


async def play(url: str, system: str, convs: list[list[str]], clients: int, max_tokens: int,
               think: tuple[float, float] = (0.0, 0.0), seed: int = 0) -> dict:
    queue = list(reversed(convs))
    stats = {"tokens": 0, "prompt": 0, "cached": 0, "latencies": []}
    rng = random.Random(seed)

    async def client_loop(h):
        while queue:
            messages = [{"role": "system", "content": system}]
            for turn, question in enumerate(queue.pop()):
                if turn:  # the user reads the answer and types the next question
                    await asyncio.sleep(rng.uniform(*think))
                messages.append({"role": "user", "content": question})
                body = {"model": "base", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                t0 = time.perf_counter()
                r = await h.post(url + "/v1/chat/completions", json=body, headers=AUTH)
                if r.status_code != 200:
                    raise SystemExit(f"a turn answered {r.status_code}: {r.text}")
                stats["latencies"].append(time.perf_counter() - t0)
                answer = r.json()
                usage = answer["usage"]
                stats["tokens"] += usage["completion_tokens"]
                stats["prompt"] += usage["prompt_tokens"]
                stats["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
                messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})

    async with httpx.AsyncClient(timeout=600) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(h) for _ in range(clients)))
        stats["seconds"] = time.perf_counter() - t0
    return stats


def measure(args, model_dir, env, policy: str, flags, system: str, convs) -> dict:
    with Fleet(args, model_dir, env, policy, flags) as fleet:
        warm = [[f"Warm-up {i}."] for i in range(40)]  # the base model becomes a hot key: both engines
        asyncio.run(play(fleet.url, "Hi.", warm, 4, 1))
        return asyncio.run(play(fleet.url, system, convs, args.clients, args.max_tokens, args.think, args.seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=6, help="questions per conversation (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=32, help="conversations going on at once (default: %(default)s)")
    ap.add_argument("--think", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                    help="seconds a user takes between an answer and the next question, drawn uniformly "
                         "(default: %(default)s)")
    ap.add_argument("--engines", type=int, default=2, help="engine replicas, one thread each (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--max-engine-load", type=int, default=0,
                    help="the router's spill threshold per engine (default: 2/3 of the clients)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)  # before LORAGATE_HOME moves to the bench's own home
    system, convs = conversations(args.conversations, args.turns, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-prefix-"))
    env = dict(os.environ, LORAGATE_HOME=str(tmp / "home"), LORAGATE_API_KEYS=f"{KEY}=bench",
               LORAGATE_SERVED_MODEL_NAME="base")
    print(f"{args.conversations} conversations x {args.turns} turns, {args.clients} at once, think time "
          f"{args.think[0]:g}-{args.think[1]:g} s, {args.max_tokens} tokens per answer, {args.engines} engines x --num-threads 1, model {Path(model_dir).name} {args.dtype}", flush=True)
    results = {}
    for name, policy, flags in RUNS:
        r = results[name] = measure(args, model_dir, env, policy, flags, system, convs)
        print(f"  {name:<18} {r['tokens'] / r['seconds']:7.1f} tok/s ({r['seconds']:.1f} s)   prompt tokens from "
              f"the prefix cache {r['cached'] / r['prompt']:6.1%} of {r['prompt']}   mean latency "
              f"{statistics.mean(r['latencies']):.2f} s", flush=True)
    speed = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    on = "prefix routing"
    print(f"prefix routing vs off: {speed[on] / speed['no prefix routing']:.2f}x throughput; "
          f"vs round-robin: {speed[on] / speed['round-robin']:.2f}x")


if __name__ == "__main__":
    main()
