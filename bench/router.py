"""Adapter-affinity routing vs round-robin over two engine replicas, side by side in one run.

    python bench/router.py [--requests 256] [--clients 32] [--max-tokens 32] [--zipf 1.0] [--session 1]
                           [--max-cpu-loras N] [--partition] [--repeats 1]

Two `loragate serve --role engine` replicas (SmolLM2-135M-Instruct bf16, --max-loras 4 and
--num-threads 1 each) share one LORAGATE_HOME, so one adapter store; 16 rank-16 peft adapters
with random B (q,k,v,o) are uploaded through a `--role router`. Then the same request mix
(adapter popularity Zipf(s) over the 16, seeded, drawn per request or per session of
--session requests a client sends in a row; greedy, ignore_eos, --max-tokens each; N
closed-loop clients) runs through the router twice: --route-policy round_robin, then
affinity, each on freshly started engines so neither inherits warm slots. Prints output
tok/s for both and the ratio (target >= 1.3x), and adapter loads per replica (slot loads:
each engine's loragate_adapter_pool_misses; of them, loragate_adapter_pool_store_loads read
the store rather than host memory) for both and the ratio (target >= 3x fewer). --partition
adds the ceiling of any affinity router: the adapters split over the engines once, by their
known share of the mix, so the engines' loads are equal and their adapter sets disjoint, with
each request sent straight to its adapter's engine.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from multi_lora import TARGETS, make_adapters  # noqa: E402

from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loragate.gateway.cli", "serve", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, procs, engines: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a server process exited during start-up (run it by hand to see why)")
        try:
            if len(httpx.get(url + "/readyz", timeout=2).json().get("engines", [])) == engines:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit("the fleet did not become ready")


def pool_counts(url: str) -> tuple[int, int]:
    """(slot loads, those of them read from the store) an engine has made since start."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("loragate_adapter_pool_misses", "loragate_adapter_pool_store_loads"):
            values[name] = int(float(value))
    if len(values) != 2:
        raise SystemExit(f"{url}/metrics lacks the adapter pool's counters")
    return values["loragate_adapter_pool_misses"], values["loragate_adapter_pool_store_loads"]


def router_counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


class Fleet:
    """args.engines engines (default 2) and a router with one routing policy; stopped on exit."""

    def __init__(self, args, model_dir: Path, env: dict, policy: str, router_flags: tuple[str, ...] = ()):
        self.engine_urls, self.procs = [], []
        for _ in range(getattr(args, "engines", 2)):
            port = free_port()
            self.engine_urls.append(f"http://127.0.0.1:{port}")
            self.procs.append(serve(["--role", "engine", "--model", str(model_dir), "--dtype", args.dtype,
                                     "--max-loras", "4", "--num-threads", "1", "--port", str(port),
                                     "--max-num-seqs", str(args.clients),
                                     *(["--max-cpu-loras", str(args.max_cpu_loras)] if args.max_cpu_loras else [])],
                                    env))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        max_load = args.max_engine_load or math.ceil(args.clients * 2 / 3)  # room for popularity skew before spilling
        self.procs.append(serve(["--role", "router", "--engine-urls", ",".join(self.engine_urls), "--port", str(port),
                                 "--route-policy", policy, "--max-engine-load", str(max_load),
                                 "--health-interval", "1", *router_flags], env))
        try:
            wait_ready(self.url, self.procs, len(self.engine_urls))
        except BaseException:
            self.__exit__()  # no orphaned servers when start-up fails
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


async def run_mix(url, jobs, clients: int, max_tokens: int, session: int = 1) -> tuple[int, float]:
    """Closed-loop clients take the jobs in order, `session` consecutive jobs at a time (a
    session's jobs share one adapter), and send each when their previous answer is in, to
    `url` (or to url(model): the partition arm's engines)."""
    url_of = url if callable(url) else lambda model: url
    queue = [jobs[i:i + session] for i in range(0, len(jobs), session)][::-1]
    tokens = 0

    async def client_loop(h):
        nonlocal tokens
        while queue:
            for prompt, model in queue.pop():
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                r = await h.post(url_of(model) + "/v1/completions", json=body, headers=AUTH)
                if r.status_code != 200:
                    raise SystemExit(f"request for {model!r} answered {r.status_code}: {r.text}")
                tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(h) for _ in range(clients)))
        return tokens, time.perf_counter() - t0


def partition(weights: dict[str, float], engines: int) -> dict[str, int]:
    """Adapters over engines by their share of the mix, each to the least loaded engine so
    far, most popular first (longest-processing-time first): about equal load, disjoint sets."""
    load, place = [0.0] * engines, {}
    for name in sorted(weights, key=lambda n: -weights[n]):
        place[name] = load.index(min(load))
        load[place[name]] += weights[name]
    return place


def measure(args, model_dir, env, policy, jobs, adapter_dirs, upload: bool, place=None) -> dict:
    """One arm on a new fleet. `place` (the partition arm): requests go straight to the
    engine it names for their adapter, the router idle."""
    with Fleet(args, model_dir, env, "round_robin" if place else policy) as fleet:
        if upload:
            for i, d in enumerate(adapter_dirs):
                files = [("file", (p.name, p.read_bytes())) for p in sorted(d.iterdir()) if p.is_file()]
                httpx.post(fleet.url + "/v1/adapters", data={"name": f"a{i}"}, files=files, headers=AUTH,
                           timeout=120).raise_for_status()
        for url in fleet.engine_urls:  # warm-up on the base model: no slot loads before the count
            asyncio.run(run_mix(url, [(jobs[0][0], "base")] * 2, 2, 4))
        before = [pool_counts(u) for u in fleet.engine_urls]
        target = (lambda model: fleet.engine_urls[place[model]]) if place else fleet.url
        tokens, seconds = asyncio.run(run_mix(target, jobs, args.clients, args.max_tokens, args.session))
        after = [pool_counts(u) for u in fleet.engine_urls]
        spills = router_counter(fleet.url, "loragate_router_spills_total")
    return {"tok_s": tokens / seconds, "seconds": seconds, "loads": [a[0] - b[0] for a, b in zip(after, before)],
            "store_loads": sum(a[1] - b[1] for a, b in zip(after, before)), "spills": spills}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.0, help="adapter popularity exponent (0: uniform)")
    ap.add_argument("--session", type=int, default=1,
                    help="requests a client sends in a row for one adapter (a conversation or an agent's run); "
                         "each session draws its adapter (default: %(default)s, every request draws its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-engine-load", type=int, default=0,
                    help="the router's spill threshold per engine (default: 2/3 of the clients)")
    ap.add_argument("--max-cpu-loras", type=int, default=0,
                    help="adapters each engine keeps in host memory; fewer than --adapters models a fleet whose "
                         "adapters do not all fit one engine, so slot loads that miss it read the store "
                         "(default: the engine's default, 32)")
    ap.add_argument("--engines", type=int, default=2, help="engine replicas (default: %(default)s, the issue's)")
    ap.add_argument("--partition", action="store_true",
                    help="a third arm, the ceiling of any affinity router: the adapters split over the engines by "
                         "their known share of the mix (equal load, disjoint sets), requests sent straight there")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs of runs, each on new engine ports: the rendezvous split of the adapters over the "
                         "engines follows the ports, so one pair shows one split (default: %(default)s)")
    args = ap.parse_args()
    model_dir = resolve_model(args.model)  # before LORAGATE_HOME moves to the bench's own home
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-router-"))
    adapter_dirs = make_adapters(model_dir, tmp / "adapters", TARGETS["attn"], args.adapters)

    import argparse as source
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(inspect.getsource(source))
    rng = random.Random(args.seed)
    weights = [1 / (k + 1) ** args.zipf for k in range(args.adapters)]
    names = [f"a{i}" for i in range(args.adapters)]
    starts = [(400 + 97 * i) % (len(ids) - 48) for i in range(args.requests)]  # 48-token prompts, never empty
    adapters = [rng.choices(names, weights)[0] for _ in range(0, args.requests, args.session)]
    jobs = [(tok.decode(ids[s:s + 48]), adapters[i // args.session]) for i, s in enumerate(starts)]

    env = dict(os.environ, LORAGATE_HOME=str(tmp / "home"), LORAGATE_API_KEYS=f"{KEY}=bench",
               LORAGATE_SERVED_MODEL_NAME="base")
    print(f"{args.requests} requests, {args.clients} clients, {args.max_tokens} tokens each, {args.adapters} adapters "
          f"(Zipf s={args.zipf:g}, sessions of {args.session}), {args.engines} engines x --max-loras 4 --num-threads 1"
          f"{f' --max-cpu-loras {args.max_cpu_loras}' if args.max_cpu_loras else ''}, "
          f"model {Path(model_dir).name} "
          f"{args.dtype}", flush=True)
    speedups, load_ratios = [], []
    for repeat in range(args.repeats):
        results = {}
        for policy in ("round_robin", "affinity"):  # the store is uploaded once, through the first fleet
            results[policy] = measure(args, model_dir, env, policy, jobs, adapter_dirs,
                                      upload=repeat == 0 and policy == "round_robin")
        if args.partition:
            results["partition"] = measure(args, model_dir, env, "partition", jobs, adapter_dirs, upload=False,
                                           place=partition(dict(zip(names, weights)), args.engines))
        rr, aff = results["round_robin"], results["affinity"]
        for policy, r in results.items():
            print(f"  {policy:<12} {r['tok_s']:7.1f} tok/s ({r['seconds']:.1f} s)   adapter loads per replica "
                  f"{' + '.join(map(str, r['loads']))} = {sum(r['loads'])} ({r['store_loads']} from the store)   "
                  f"spills {r['spills']:.0f}")
        speedups.append(aff["tok_s"] / rr["tok_s"])
        load_ratios.append(sum(rr["loads"]) / max(1, sum(aff["loads"])))
        print(f"affinity vs round-robin: throughput {speedups[-1]:.2f}x (target >= 1.3x), "
              f"adapter loads {load_ratios[-1]:.1f}x fewer (target >= 3x)", flush=True)
        if args.partition:
            part = results["partition"]
            print(f"partition vs round-robin: throughput {part['tok_s'] / rr['tok_s']:.2f}x, adapter loads "
                  f"{sum(rr['loads']) / max(1, sum(part['loads'])):.1f}x fewer", flush=True)
    if args.repeats > 1:
        print(f"over {args.repeats} engine-port splits: throughput {statistics.mean(speedups):.2f}x "
              f"({min(speedups):.2f}-{max(speedups):.2f}), adapter loads {statistics.mean(load_ratios):.1f}x fewer "
              f"({min(load_ratios):.1f}-{max(load_ratios):.1f})")


if __name__ == "__main__":
    main()
