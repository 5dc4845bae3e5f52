"""The Helm chart's Grafana dashboard (helm/loragate/dashboards/loragate.json) asks only for
metrics that engines and routers expose: every name in its queries is scraped here from a
running engine (speculation and rate limits on, so their metrics exist) and a router."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from loragate.gateway.rate_limits import TenantRateLimits
from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import RunningServer

DASHBOARD = Path(__file__).parents[2] / "helm" / "loragate" / "dashboards" / "loragate.json"


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def exposed(text: str) -> set[str]:
    """The series names /metrics declares, with or without samples yet (a labelled counter
    has none until its first increment: the retries of a router that has not retried)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_every_metric_the_dashboard_queries_is_exposed(tiny_llama, tmp_path, monkeypatch):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(next(v["definition"] for v in dashboard["templating"]["list"] if v["name"] == "namespace"))
    queried = {name for e in exprs for name in re.findall(r"\b(loragate_[a-z0-9_]+)", e)}
    assert len(queried) > 20

    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    engine = RunningServer(tiny_llama, None, speculative="ngram")
    engine.state.rate_limits = TenantRateLimits(requests_per_minute=1)
    try:
        body = {"model": "tiny", "prompt": "t5 t6 t5 t6 t5 t6", "max_tokens": 8, "ignore_eos": True}
        assert httpx.post(engine.url + "/v1/completions", json=body, headers=engine.headers()).status_code == 200
        assert httpx.post(engine.url + "/v1/completions", json=body, headers=engine.headers()).status_code == 429
        names = exposed(httpx.get(engine.url + "/metrics").text)
        settings = GatewaySettings(role="router", engine_urls=engine.url, health_interval=60.0,
                                   api_keys="key-b=tenant-b", tenant_requests_per_minute=60)
        with TestClient(build_router_app(settings)) as router:
            assert router.post("/v1/completions", json=body, headers=engine.headers("key-b")).status_code == 200
            names |= exposed(router.get("/metrics").text)
    finally:
        engine.stop()
    assert queried <= names, f"the dashboard queries metrics nobody exposes: {sorted(queried - names)}"
