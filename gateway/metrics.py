"""Prometheus metrics for /metrics: HTTP requests by route and status, latency histograms
(time to first token, inter-token, end to end, queue time), finished requests by reason,
token counts by tenant and adapter (usage metering), and engine gauges read at scrape time
(running/waiting requests, open requests per tenant, rate-limited requests, preemptions,
KV-cache use, prefix-cache hit rate, adapter pool, CUDA graphs), and the ones that have
vLLM's names under them too, with vLLM's request metrics (vllm_metrics.py).

Adapter labels are bounded: the first MAX_ADAPTER_LABELS adapters seen get their own label,
the rest share "other", so a tenant with thousands of adapters cannot explode cardinality.
Tenants are those of the configured keys (one, "default", on an open server)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .vllm_metrics import VllmRequestMetrics, vllm_engine_metrics

MAX_ADAPTER_LABELS = 32
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, state):
        self.state = state
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loragate_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("loragate_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loragate_inter_token_latency_seconds", "time between tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loragate_e2e_request_latency_seconds", "request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("loragate_request_queue_time_seconds", "time a finished request waited for its first "
                               "admission to the running batch", buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("loragate_requests_finished", "engine requests that finished, by reason "
                                "(stop, length)", ["reason"], registry=r)
        self.prompt_tokens = Counter("loragate_prompt_tokens", "prompt tokens", ["tenant", "adapter"], registry=r)
        self.generation_tokens = Counter("loragate_generation_tokens", "generated tokens", ["tenant", "adapter"],
                                         registry=r)
        self.vllm = VllmRequestMetrics(r, LATENCY_BUCKETS)
        self.finish_counts: collections.Counter[str] = collections.Counter()  # by reason, for vllm:request_success
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        r.register(_EngineCollector(state))
        r.register(KeysCollector(state.keys))

    # Each event feeds loragate's metric and vLLM's of the same meaning (vllm_metrics.py).
    def prompt(self, labels: tuple[str, str], tokens: int) -> None:
        self.prompt_tokens.labels(*labels).inc(tokens)
        self.vllm.prompt_tokens.labels(self.state.model_name).inc(tokens)

    def output(self, labels: tuple[str, str], seconds: float, first: bool, tokens: int) -> None:
        """One output of a request: `tokens` new tokens, `seconds` after the previous one (or
        after the request began, for its first)."""
        ttft, itl, generated = self.vllm.per_token(self.state.model_name)
        (self.ttft if first else self.itl).observe(seconds)
        (ttft if first else itl).observe(seconds)
        self.generation_tokens.labels(*labels).inc(tokens)
        generated.inc(tokens)

    def finish(self, reason: str, e2e: float, queue: float, ttft: float, prompt_len: int, gen_len: int) -> None:
        self.e2e.observe(e2e)
        self.queue.observe(queue)
        self.finished.labels(reason).inc()
        self.finish_counts[reason] += 1
        self.vllm.finished(self.state.model_name, e2e, queue, ttft, prompt_len, gen_len)

    def adapter_label(self, adapter_key: str | None) -> str:
        if adapter_key is None:
            return "base"
        name = adapter_key.rsplit("@", 1)[0]
        with self._lock:
            if name in self._labels or len(self._labels) < MAX_ADAPTER_LABELS:
                self._labels.add(name)
                return name
        return "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        inner = engine.engine
        kv, pool = inner.kv, inner.lora_pool

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        yield gauge("loragate_requests_running", "requests running in the engine", len(inner.scheduler.running))
        per_tenant = GaugeMetricFamily("loragate_tenant_requests_open", "inference requests open (running or waiting) "
                                       "per tenant", labels=["tenant"])
        for tenant, count in sorted(self.state.tenant_in_flight.items()):
            per_tenant.add_metric([tenant], count)
        yield per_tenant
        yield self.state.rate_limits.refused_metric()
        yield gauge("loragate_requests_waiting", "requests waiting for the engine", engine.num_waiting)
        c = GaugeMetricFamily("loragate_preemptions", "running requests preempted for KV blocks (recomputed "
                              "later), since start")
        c.add_metric([], inner.scheduler.num_preemptions)
        yield c
        yield gauge("loragate_kv_cache_usage_ratio", "fraction of KV blocks in use", kv.usage)
        hit = kv.num_prefix_hit_tokens / kv.num_prefix_queries_tokens if kv.num_prefix_queries_tokens else 0.0
        yield gauge("loragate_prefix_cache_hit_ratio", "prompt tokens served from the prefix cache", hit)
        if pool is not None:
            s = pool.stats
            yield gauge("loragate_adapter_slots_loaded", "adapters loaded in pool slots", len(pool.slot_of))
            yield gauge("loragate_adapter_slots_pinned", "slots pinned by running requests", pool.num_pinned)
            for name, value in (("hits", s.hits), ("misses", s.misses), ("evictions", s.evictions)):
                c = GaugeMetricFamily(f"loragate_adapter_pool_{name}", f"adapter pool {name} since start")
                c.add_metric([], value)
                yield c
            c = GaugeMetricFamily("loragate_adapter_pool_store_loads", "slot loads that read the adapter from the "
                                  "store, not host memory (--max-cpu-loras, --max-cpu-lora-memory), since start")
            c.add_metric([], s.store_loads)
            yield c
            loads = s.load_seconds
            yield gauge("loragate_adapter_load_seconds_recent_mean", "mean of the last 100 adapter loads",
                        sum(loads) / len(loads) if loads else 0.0)
        graphs = inner.runner.graphs
        if graphs is not None:  # on CUDA, unless --cuda-graphs false
            yield gauge("loragate_cuda_graphs_enabled", "1 while steps may replay CUDA graphs; 0 after a capture failed "
                        "(every step eager)", int(graphs.enabled))
            yield gauge("loragate_cuda_graphs_held", "CUDA graphs captured and kept", len(graphs.graphs))
            for name, doc, value in (("captures", "CUDA graphs captured", graphs.num_captured),
                                     ("replayed_steps", "engine steps replayed as CUDA graphs", graphs.num_replayed)):
                c = GaugeMetricFamily(f"loragate_cuda_graph_{name}", f"{doc} since start")
                c.add_metric([], value)
                yield c
        for name, doc, value in (
                ("jump_forward_tokens", "grammar-forced tokens verified as proposals instead of decoded one step each",
                 inner.num_forced_accepted),
                ("predicted_tokens_accepted", "tokens of predicted outputs (OpenAI's prediction) taken as proposed",
                 inner.num_prediction_accepted),
                ("requests_aborted", "engine requests ended before they finished: the client hung up, or a request "
                 "beside it was refused", inner.num_aborted)):
            c = GaugeMetricFamily(f"loragate_{name}", f"{doc}, since start")
            c.add_metric([], value)
            yield c
        if inner.speculator is not None:
            st = inner.speculator.stats
            for name, doc, value in (
                    ("proposed_tokens", "speculative tokens proposed and verified", st.num_proposed),
                    ("accepted_tokens", "speculative tokens the target accepted", st.num_accepted),
                    ("verify_steps", "request-steps that verified speculative tokens", st.num_verify_steps),
                    ("speculative_steps", "engine steps decoded speculatively", st.num_speculative_steps),
                    ("plain_steps", "engine steps decoded without speculation", st.num_plain_steps)):
                c = GaugeMetricFamily(f"loragate_spec_{name}", f"{doc} since start")
                c.add_metric([], value)
                yield c
            yield gauge("loragate_spec_acceptance_ratio", "accepted / proposed speculative tokens", st.acceptance_rate)
            yield gauge("loragate_spec_mean_accepted_length", "tokens emitted per verification step of a request",
                        st.mean_accepted_length)
        yield from vllm_engine_metrics(self.state, engine)


class KeysCollector:
    """The API keys read from a keys file (auth.py: reloaded while serving), on engines and routers."""

    def __init__(self, keys):
        self.keys = keys

    def collect(self):
        if self.keys is None or self.keys.keys_file is None:
            return
        for name, doc, value in (("api_keys", "API keys that authenticate, the admin key included", self.keys.num_keys),
                                 ("api_keys_reload_errors", "reloads of the keys file that failed (the keys in use "
                                  "stayed), since start", self.keys.reload_errors)):
            g = GaugeMetricFamily(f"loragate_{name}", doc)
            g.add_metric([], value)
            yield g


class RequestCounter:
    """ASGI middleware: count every HTTP request by route template and final status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status["code"])).inc()


def now() -> float:
    return time.monotonic()
