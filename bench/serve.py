"""The HTTP server under load vs the engine called directly, in one run.

    python bench/serve.py [--clients 16] [--requests 48] [--max-tokens 64]

Starts `loragate serve` (SmolLM2-135M, bf16) as a subprocess, uploads 4 rank-16 adapters made
with peft over REST, then N concurrent streaming clients send requests spread over the
adapters and the base model. Prints TTFT p50/p99, inter-token latency p50/p99 and total
output tok/s; then runs the same requests through an in-process AsyncEngine and prints the
HTTP overhead as the throughput lost (target <= 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
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

from loragate.engine import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def http_load(url, key, jobs, clients, max_tokens):
    ttfts, itls, tokens = [], [], 0
    sem = asyncio.Semaphore(clients)

    async def one(h, prompt, model):
        nonlocal tokens
        async with sem:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = last = time.perf_counter()
            first = True
            async with h.stream("POST", url + "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
                        continue
                    now = time.perf_counter()
                    (ttfts if first else itls).append(now - (t0 if first else last))
                    first, last = False, now

    async with httpx.AsyncClient(timeout=300) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(h, p, m) for p, m in jobs))
        return ttfts, itls, tokens / (time.perf_counter() - t0)


async def direct_load(engine, jobs, clients, max_tokens, names):
    sem = asyncio.Semaphore(clients)
    tokens = 0

    async def one(prompt, model):
        nonlocal tokens
        async with sem:
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            async for out in await engine.add_request(prompt, params, adapter=names.get(model)):
                if out.finished:
                    tokens += len(out.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, m) for p, m in jobs))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model_dir = resolve_model(DEFAULT_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-serve-"))
    dirs = make_adapters(model_dir, tmp / "adapters", TARGETS["attn"], 4)
    import argparse as source
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(inspect.getsource(source))
    models = [DEFAULT_MODEL, "a0", "a1", "a2", "a3"]
    jobs = [(tok.decode(ids[400 + 97 * i:][:64]), models[i % len(models)]) for i in range(args.requests)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, key = f"http://127.0.0.1:{port}", "bench-key"
    env = dict(os.environ, LORAGATE_HOME=str(tmp / "home"), LORAGATE_API_KEYS=f"{key}=bench")
    server = subprocess.Popen([sys.executable, "-m", "loragate.gateway.cli", "serve", "--port", str(port),
                               "--max-num-seqs", str(args.clients)], env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        for i, d in enumerate(dirs):
            files = [("file", (p.name, p.read_bytes())) for p in sorted(d.iterdir())]
            httpx.post(url + "/v1/adapters", data={"name": f"a{i}"}, files=files,
                       headers={"Authorization": f"Bearer {key}"}, timeout=60).raise_for_status()
        asyncio.run(http_load(url, key, jobs[:4], 4, 4))  # warm-up
        ttfts, itls, http_tps = asyncio.run(http_load(url, key, jobs, args.clients, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    engine = AsyncEngine(EngineConfig(model=str(model_dir), max_num_seqs=args.clients), progress=False)
    names = {}
    for i, d in enumerate(dirs):
        engine.add_adapter(f"a{i}", d)
        names[f"a{i}"] = f"a{i}"

    async def run_direct():
        await direct_load(engine, [(tok.encode(p), m) for p, m in jobs[:4]], 4, 4, names)
        return await direct_load(engine, [(tok.encode(p), m) for p, m in jobs], args.clients, args.max_tokens, names)

    direct_tps = asyncio.run(run_direct())
    engine.shutdown()
    overhead = 1 - http_tps / direct_tps
    print(f"{args.clients} streaming clients, {args.requests} requests over base + 4 adapters, "
          f"{args.max_tokens} tokens each")
    print(f"TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms, p99 {pct(ttfts, 0.99) * 1e3:.0f} ms; "
          f"inter-token p50 {statistics.median(itls) * 1e3:.1f} ms, p99 {pct(itls, 0.99) * 1e3:.1f} ms")
    print(f"HTTP {http_tps:.1f} tok/s, engine direct {direct_tps:.1f} tok/s: HTTP overhead {overhead * 100:.1f}% "
          f"of throughput (target <= 10%)")


if __name__ == "__main__":
    main()
