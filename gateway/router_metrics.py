"""Prometheus metrics of the router (its own /metrics; engines keep theirs): requests per
engine and status, retries, ejections, spills, and per-engine health and in-flight gauges
read at scrape time. Engine labels are base URLs: as many as there are engines."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .metrics import KeysCollector


class RouterMetrics:
    def __init__(self, pool):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loragate_router_requests", "requests proxied, by engine and engine status "
                                "('error': no status, the connection failed)", ["replica", "status"], registry=r)
        self.retries = Counter("loragate_router_retries", "requests retried on another engine, by cause",
                               ["reason"], registry=r)
        self.ejections = Counter("loragate_router_ejections", "engines taken out of rotation (failed health "
                                 "check or connection error), by engine", ["replica"], registry=r)
        self.spills = Counter("loragate_router_spills", "requests sent past their adapter's preferred engine "
                              "because it was at max_engine_load", registry=r)
        self.prefix_routed = Counter("loragate_router_prefix_routed", "requests sent to the engine that last ran "
                                     "the start of their prompt (its prefix cache) rather than the least loaded "
                                     "of their adapter's engines", registry=r)
        self.unavailable = Counter("loragate_router_unavailable", "requests answered 503 because no engine "
                                   "could take them", registry=r)
        self.stream_cuts = Counter("loragate_router_stream_cuts", "streams whose engine went away mid-way "
                                   "(ended with an error event)", ["replica"], registry=r)
        r.register(_ReplicaCollector(pool))

    def watch_rate_limits(self, limits) -> None:
        """Export the requests the router's rate limits (router_limits.py) refused, if it keeps any."""
        if limits is not None:
            self.registry.register(_RateLimitCollector(limits))
            self.registry.register(KeysCollector(limits.keys))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector:
    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        healthy = GaugeMetricFamily("loragate_router_replica_healthy", "1 if the engine is in rotation",
                                    labels=["replica"])
        in_flight = GaugeMetricFamily("loragate_router_replica_in_flight", "requests the router has open on the "
                                      "engine", labels=["replica"])
        engine_load = GaugeMetricFamily("loragate_router_replica_engine_load", "requests running and waiting in "
                                        "the engine at its last health check (every router's)", labels=["replica"])
        for replica in self.pool.all():
            healthy.add_metric([replica.url], 1.0 if replica.is_healthy else 0.0)
            in_flight.add_metric([replica.url], replica.in_flight)
            engine_load.add_metric([replica.url], replica.reported_load)
        yield healthy
        yield in_flight
        yield engine_load


class _RateLimitCollector:
    def __init__(self, limits):
        self.limits = limits

    def collect(self):
        yield self.limits.limits.refused_metric()
        if self.limits.shared is not None:
            errors = GaugeMetricFamily("loragate_router_rate_limit_store_errors", "calls to the shared rate-limit "
                                       "store (Redis) that failed, answered from this router's own buckets instead, "
                                       "since start")
            errors.add_metric([], self.limits.store_errors)
            yield errors
