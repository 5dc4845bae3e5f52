"""The engine gauges under vLLM's metric names, beside loragate's own on /metrics.

Kubernetes' Gateway API Inference Extension (the endpoint picker of llm-d and of GKE's
inference gateway) schedules requests over model-server pods from these names by default:
queue length, KV-cache use, the KV block size (prefix-cache-aware scoring), and for LoRA
affinity vllm:lora_requests_info, whose labels list the adapters of running and of waiting
requests and the slot count. Recent pickers mark a pod without it unhealthy. Grafana
dashboards written for vLLM read the same names.

Adapters are named as requests name them (`model`), without the tenant or version the engine
keys them by: that is what the picker matches a request's `model` against.
"""

from __future__ import annotations

import time

from prometheus_client.core import GaugeMetricFamily


def served_name(engine_key: str) -> str:
    """'tenant/name@version' (the gateway's engine key for an adapter) -> 'name'."""
    name = engine_key.rsplit("@", 1)[0]
    return name.split("/", 1)[1] if "/" in name else name


def _joined(requests) -> str:
    return ",".join(sorted({served_name(r.adapter) for r in requests if r.adapter is not None}))


def vllm_gauges(state, engine):
    """The gauges, read from `engine` (the AsyncEngine) at scrape time."""
    inner = engine.engine
    scheduler, kv, pool = inner.scheduler, inner.kv, inner.lora_pool
    model = {"model_name": state.model_name}
    for name, doc, value in (
            ("vllm:num_requests_running", "requests in the running batch", len(scheduler.running)),
            ("vllm:num_requests_waiting", "requests waiting to run", engine.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache use, 0 to 1 (1 = full)", kv.usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache use, 0 to 1 (vLLM's name before v0.10)", kv.usage)):
        g = GaugeMetricFamily(name, doc, labels=list(model))
        g.add_metric(list(model.values()), value)
        yield g
    info = {"block_size": str(kv.block_size), "num_gpu_blocks": str(kv.num_blocks),
            "enable_prefix_caching": str(kv.enable_prefix_caching)}
    g = GaugeMetricFamily("vllm:cache_config_info", "KV-cache configuration", labels=list(info))
    g.add_metric(list(info.values()), 1)
    yield g
    if pool is not None:
        # list() of a deque or list copies it under the GIL: the engine thread cannot change it midway
        lora = {"max_lora": str(pool.num_slots), "running_lora_adapters": _joined(list(scheduler.running)),
                "waiting_lora_adapters": _joined(list(scheduler.waiting))}
        g = GaugeMetricFamily("vllm:lora_requests_info", "adapters of running and waiting requests; the value "
                              "is when this was read", labels=list(lora))
        g.add_metric(list(lora.values()), time.time())
        yield g
