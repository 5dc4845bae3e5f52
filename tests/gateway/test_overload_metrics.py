"""Backpressure (429 + Retry-After beyond the waiting limit) and /metrics that add up."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import RunningServer, drop_a_stream


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_overload_gets_429_and_metrics_match(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_waiting=3, max_num_seqs=2)
    body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 40, "temperature": 0}
    try:
        async def one(h):
            return await h.post(s.url + "/v1/completions", json=body, headers=s.headers())

        loads = []  # what /readyz says the engine holds, for the routers in front of it

        async def watch(h, done: asyncio.Event):
            while not done.is_set():
                loads.append((await h.get(s.url + "/readyz")).json()["load"])
                await asyncio.sleep(0.02)

        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                done = asyncio.Event()
                watcher = asyncio.create_task(watch(h, done))
                responses = await asyncio.gather(*(one(h) for _ in range(30)))
                done.set()
                await watcher
                return responses

        responses = asyncio.run(main())
        assert max(x["running"] for x in loads) == 2 and max(x["waiting"] for x in loads) > 0
        assert httpx.get(s.url + "/readyz").json()["load"] == {"running": 0, "waiting": 0}
        codes = [r.status_code for r in responses]
        ok, busy = codes.count(200), codes.count(429)
        assert ok + busy == 30 and busy > 0 and ok >= 3, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 40  # every accepted request completed
        m = samples(httpx.get(s.url + "/metrics").text)
        route = "/v1/completions"
        assert m[("loragate_http_requests_total", (("route", route), ("status", "200")))] == ok
        assert m[("loragate_http_requests_total", (("route", route), ("status", "429")))] == busy
        assert m[("loragate_generation_tokens_total", (("adapter", "base"), ("tenant", "tenant-a")))] == 40 * ok
        assert m[("loragate_time_to_first_token_seconds_count", ())] == ok
        assert m[("loragate_e2e_request_latency_seconds_count", ())] == ok
        assert m[("loragate_requests_finished_total", (("reason", "length"),))] == ok
        # Two run at a time, so the others queued: their waits add up to more than nothing.
        assert m[("loragate_request_queue_time_seconds_count", ())] == ok
        assert m[("loragate_request_queue_time_seconds_sum", ())] > 0
        assert m[("loragate_preemptions", ())] >= 0
        assert m[("loragate_requests_running", ())] == 0
        assert m[("loragate_kv_cache_usage_ratio", ())] == 0.0
    finally:
        s.stop()


def test_one_tenants_flood_is_held_at_its_own_limit(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_tenant_requests=2)
    engine = s.state.engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or step())  # long requests stay open
    long = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    short = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 2}

    async def until(condition):
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"still {s.state.tenant_in_flight}")

    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                async with h.stream("POST", s.url + "/v1/completions", json=long, headers=s.headers()) as first:
                    first_lines = first.aiter_lines()  # kept: a dropped iterator closes the connection
                    await anext(first_lines)
                    chat = dict(long, messages=[{"role": "user", "content": "t5"}])
                    async with h.stream("POST", s.url + "/v1/chat/completions", json=chat, headers=s.headers()) as second:
                        second_lines = second.aiter_lines()
                        await anext(second_lines)
                        assert s.state.tenant_in_flight == {"tenant-a": 2}
                        scraped = samples((await h.get(s.url + "/metrics")).text)
                        assert scraped[("loragate_tenant_requests_open", (("tenant", "tenant-a"),))] == 2
                        over = await h.post(s.url + "/v1/completions", json=short, headers=s.headers())
                        other = await h.post(s.url + "/v1/completions", json=short, headers=s.headers("key-b"))
                    await until(lambda: s.state.tenant_in_flight == {"tenant-a": 1})  # dropped mid-stream: freed
                    again = await h.post(s.url + "/v1/completions", json=short, headers=s.headers())
                await until(lambda: s.state.tenant_in_flight == {})  # nothing held once every request is over
                return over, other, again

        over, other, again = asyncio.run(main())
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "tenant_limit" and "tenant-a" in over.json()["error"]["message"]
        assert other.status_code == 200 and again.status_code == 200  # other tenants never wait on it
    finally:
        s.stop()


def test_not_ready_is_503_until_the_model_loads(tiny_llama, tmp_path, monkeypatch):
    import threading

    from loragate.gateway import server as server_module

    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    gate = threading.Event()
    real = server_module.make_loader

    def slow_loader(config, settings):
        load = real(config, settings)
        return lambda state: (gate.wait(30), load(state))

    s = RunningServer(tiny_llama, None, load_async=True, loader_factory=slow_loader)
    try:
        r = httpx.get(s.url + "/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert httpx.get(s.url + "/ping").status_code == 503  # SageMaker sends no traffic yet
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "t5"}, headers=s.headers())
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert httpx.get(s.url + "/healthz").status_code == 200
        gate.set()
        for _ in range(200):
            if httpx.get(s.url + "/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(s.url + "/readyz").status_code == httpx.get(s.url + "/ping").status_code == 200
    finally:
        s.stop()


def test_a_dead_engine_is_503_not_a_hang(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    try:
        def broken_step():
            raise RuntimeError("simulated kernel failure")

        monkeypatch.setattr(s.state.engine.engine, "step", broken_step)
        body = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 5, "stream": True}
        r = httpx.post(s.url + "/v1/completions", json=body, headers=s.headers(), timeout=10)
        events = [line for line in r.text.split("\n") if line.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"  # in-band error, then the end
        r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, headers=s.headers(), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(s.url + "/readyz").status_code == 503
    finally:
        s.stop()


def test_a_full_queue_refuses_the_tenant_that_fills_it_not_the_others(tiny_llama, tmp_path, monkeypatch):
    """Two run, three may wait: tenant-a's flood fills the queue and gets 429s, while
    tenant-b, with nothing open, is still let in (and, with tenant turns, served next)."""
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_waiting=3, max_num_seqs=2)
    engine = s.state.engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or step())  # the flood stays queued a while
    body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 40, "ignore_eos": True}
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                def send():
                    return asyncio.create_task(h.post(s.url + "/v1/completions", json=body, headers=s.headers()))

                # Two first, running before the rest arrive: sent at once, the first three would
                # all pass the queue check before the engine took any, and only one would wait.
                flood = [send(), send()]
                while len(engine.scheduler.running) < 2:
                    assert not all(t.done() for t in flood), [t.result() for t in flood]
                    await asyncio.sleep(0.01)
                flood += [send() for _ in range(10)]
                while s.state.engine.num_waiting < 3:
                    # A flood that finished (or failed) without ever queueing 3 would leave this
                    # loop waiting forever; the assertions below then say what came back.
                    assert not all(t.done() for t in flood), [t.result() for t in flood]
                    await asyncio.sleep(0.01)
                other = await h.post(s.url + "/v1/completions", json=body, headers=s.headers("key-b"))
                return other, await asyncio.gather(*flood)

        other, flood = asyncio.run(main())
        assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 40
        codes = [r.status_code for r in flood]
        assert codes.count(429) > 0 and codes.count(200) >= 5, codes  # two ran, three waited
    finally:
        s.stop()


def test_cuda_graph_metrics_count_replayed_steps(tiny_llama, tmp_path, monkeypatch):
    """On a CPU there are no graphs, and no such metrics. With the graphs' padded form standing
    in (engine/cuda_graphs.py, not captured), every decode step of a request is replayed.
    The engine is on the CPU even where a GPU is, whose real graphs would count other steps."""
    from loragate.engine.cuda_graphs import DecodeGraphs

    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, device="cpu")
    try:
        assert "loragate_cuda_graph" not in httpx.get(s.url + "/metrics").text
        engine = s.state.engine.engine
        r = engine.runner
        r.graphs = DecodeGraphs(engine.model, r.kv_caches, r.block_size, engine.kv.num_blocks, 32, engine.lora_pool,
                                capture=False)
        body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 9, "temperature": 0, "ignore_eos": True}
        assert httpx.post(s.url + "/v1/completions", json=body, headers=s.headers(), timeout=60).status_code == 200
        m = samples(httpx.get(s.url + "/metrics").text)
        assert m[("loragate_cuda_graphs_enabled", ())] == 1
        # the 3-token prompt (a short query: a graph of 4 rows) and 8 decode steps (1 row)
        assert m[("loragate_cuda_graph_replayed_steps", ())] == 9
        assert m[("loragate_cuda_graph_captures", ())] == m[("loragate_cuda_graphs_held", ())] == 2
    finally:
        s.stop()


def test_vllm_named_gauges_for_the_inference_gateways_endpoint_picker(tiny_llama, tmp_path, monkeypatch, save_lora):
    """The names the Gateway API Inference Extension reads by default (gateway/vllm_metrics.py):
    one request runs on tenant-a's adapter `sql`, one on tenant-b's `chat` waits for the only
    running place; lora_requests_info lists them by the names requests use."""
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_num_seqs=1)
    engine = s.state.engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or step())
    try:
        for key, name in (("key-a", "sql"), ("key-b", "chat")):
            d = save_lora(tiny_llama, tmp_path / name, 0.3, seed=len(name), r=4, lora_alpha=8, target_modules=["q_proj"])
            files = [("file", (p.name, p.read_bytes())) for p in sorted(d.iterdir())]
            assert httpx.post(s.url + "/v1/adapters", data={"name": name}, files=files, headers=s.headers(key),
                              timeout=30).status_code == 201

        def body(model):
            return {"model": model, "prompt": "t5 t6", "max_tokens": 1000, "ignore_eos": True, "stream": True}

        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                async with h.stream("POST", s.url + "/v1/completions", json=body("sql"), headers=s.headers()) as a:
                    a_lines = a.aiter_lines()
                    await anext(a_lines)
                    async with h.stream("POST", s.url + "/v1/completions", json=body("chat"),
                                        headers=s.headers("key-b")) as b:
                        for _ in range(100):  # until the second one queued
                            if engine.scheduler.waiting:
                                break
                            await asyncio.sleep(0.02)
                        return samples((await h.get(s.url + "/metrics")).text)

        busy = asyncio.run(main())
        model = (("model_name", "tiny"),)
        assert busy[("vllm:num_requests_running", model)] == 1 and busy[("vllm:num_requests_waiting", model)] == 1
        assert 0 < busy[("vllm:kv_cache_usage_perc", model)] == busy[("vllm:gpu_cache_usage_perc", model)] < 1
        info = [(dict(labels), value) for (name, labels), value in busy.items() if name == "vllm:lora_requests_info"]
        assert len(info) == 1 and abs(info[0][1] - time.time()) < 60
        assert info[0][0] == {"max_lora": "4", "running_lora_adapters": "sql", "waiting_lora_adapters": "chat"}
        config = next(dict(labels) for (name, labels), _ in busy.items() if name == "vllm:cache_config_info")
        assert config["block_size"] == str(engine.kv.block_size)
        for _ in range(200):  # the streams were dropped: both requests end
            if not engine.has_unfinished:
                break
            time.sleep(0.05)
        idle = samples(httpx.get(s.url + "/metrics").text)
        info = [dict(labels) for (name, labels), _ in idle.items() if name == "vllm:lora_requests_info"]
        assert info == [{"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}]
        # the streams the client dropped are metered up to where they stopped, not left out
        metered = {dict(labels)["tenant"]: value for (name, labels), value in idle.items()
                   if name == "loragate_generation_tokens_total"}
        assert metered.get("tenant-a", 0) >= 1, metered
        assert idle[("loragate_requests_aborted", ())] == 2  # neither reached its 1000 tokens
    finally:
        s.stop()


def test_vllm_named_request_metrics_agree_with_the_responses(tiny_llama, tmp_path, monkeypatch):
    """vLLM's token counters, finished requests by reason and request histograms (what vLLM's
    Grafana dashboard and autoscalers read) count what the responses say was served."""
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, enable_prefix_caching=True)
    try:
        prompt = " ".join(f"t{i}" for i in range(5, 45))  # over two KV blocks: later requests find them cached
        greedy = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        first = httpx.post(s.url + "/v1/completions", json=greedy, headers=s.headers(), timeout=60).json()
        text = first["choices"][0]["text"]
        stop_at = text.split()[1]  # the second word ends the next one with reason "stop"
        usages, reasons = [first["usage"]], ["length"]
        for extra in ({"n": 2}, {"stop": [stop_at]}, {}):
            r = httpx.post(s.url + "/v1/completions", json=greedy | extra, headers=s.headers(), timeout=60).json()
            usages.append(r["usage"])
            reasons += [c["finish_reason"] for c in r["choices"]]
        assert reasons.count("stop") == 1 and reasons.count("length") == 4, reasons

        drop_a_stream(s)
        engine = s.state.engine.engine
        m = samples(httpx.get(s.url + "/metrics").text)
        model = (("model_name", "tiny"),)

        def by_reason(reason):
            return m[("vllm:request_success_total", (("finished_reason", reason), ("model_name", "tiny")))]

        assert (by_reason("stop"), by_reason("length"), by_reason("abort")) == (1, 4, 1)
        finished_tokens = sum(u["completion_tokens"] for u in usages)
        dropped = m[("vllm:generation_tokens_total", model)] - finished_tokens
        assert dropped >= 1  # the dropped stream's tokens, metered as they were made
        assert m[("vllm:generation_tokens_total", model)] == sum(
            v for (name, _), v in m.items() if name == "loragate_generation_tokens_total")
        prompt_len = usages[0]["prompt_tokens"]  # one prompt per request, n=2's included
        assert m[("vllm:prompt_tokens_total", model)] == 4 * prompt_len + len(engine.tokenize("t9"))
        assert m[("vllm:request_generation_tokens_count", model)] == 5
        assert m[("vllm:request_generation_tokens_sum", model)] == finished_tokens
        # n=2 is one prompt and two engine requests: each finished one counts its prompt
        assert m[("vllm:request_prompt_tokens_sum", model)] == 5 * prompt_len
        assert m[("vllm:time_to_first_token_seconds_count", model)] == 6  # the dropped one had its first
        assert m[("vllm:inter_token_latency_seconds_count", model)] == m[("loragate_inter_token_latency_seconds_count", ())]
        e2e = m[("vllm:e2e_request_latency_seconds_sum", model)]
        assert e2e == pytest.approx(m[("loragate_e2e_request_latency_seconds_sum", ())])
        parts = sum(m[(f"vllm:request_{p}_time_seconds_sum", model)] for p in ("queue", "prefill", "decode"))
        assert parts == pytest.approx(e2e, rel=1e-6)
        assert m[("vllm:request_inference_time_seconds_sum", model)] <= e2e
        queries, hits = m[("vllm:prefix_cache_queries_total", model)], m[("vllm:prefix_cache_hits_total", model)]
        assert queries > hits > 0  # the same prompt five times: its blocks were found again
        assert hits / queries == pytest.approx(m[("loragate_prefix_cache_hit_ratio", ())])
        assert m[("vllm:num_preemptions_total", model)] == m[("loragate_preemptions", ())] == 0
    finally:
        s.stop()
