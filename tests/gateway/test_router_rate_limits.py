"""Rate limits kept by the router for the whole fleet (gateway/router_limits.py): the router
in-process in front of two real engines on loopback, which keep no limits of their own and
report each request's tokens to it (gateway/charges.py)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from loragate.gateway.charges import CHARGE_HEADER
from loragate.gateway.proxy import REPLICA_HEADER
from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import RunningServer
from .test_key_shares import Clock
from .test_overload_metrics import samples

AUTH_A = {"Authorization": "Bearer key-a"}


@pytest.fixture(scope="module")
def engines(tiny_llama, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAGATE_HOME", str(tmp_path_factory.mktemp("home")))
        servers = [RunningServer(tiny_llama, None), RunningServer(tiny_llama, None)]
    yield servers
    for s in servers:
        s.stop()


def sse_events(response: httpx.Response) -> list[str]:
    return [e for e in response.text.split("\n\n") if e.strip()]


def test_an_engine_reports_the_tokens_it_charges_only_when_asked(engines):
    url = engines[0].url
    body = {"model": "tiny", "messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 12,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    asked = httpx.post(url + "/v1/chat/completions", headers={**engines[0].headers(), CHARGE_HEADER: "1"}, json=body)
    events = sse_events(asked)
    reports = [int(e.split("\n", 1)[0].rsplit(" ", 1)[1]) for e in events if e.startswith(": loragate-charge ")]
    usage = json.loads([e for e in events if '"usage": {' in e][-1].rsplit("data: ", 1)[1])["usage"]
    assert reports and int(asked.headers[CHARGE_HEADER]) + sum(reports) == usage["total_tokens"] == usage[
        "prompt_tokens"] + 12
    plain = httpx.post(url + "/v1/chat/completions", headers=engines[0].headers(), json=body)
    assert CHARGE_HEADER not in plain.headers and ": loragate-charge" not in plain.text
    answer = httpx.post(url + "/v1/embeddings", headers={**engines[0].headers(), CHARGE_HEADER: "1"},
                        json={"model": "tiny", "input": "t5 t6 t7"})
    assert int(answer.headers[CHARGE_HEADER]) == answer.json()["usage"]["total_tokens"] == 3


def test_a_reported_stream_the_client_leaves_is_aborted_and_charged_for_what_ran(engines):
    server = engines[1]
    engine = server.state.engine.engine
    generated = engine.num_generated_tokens_total
    body = {"model": "tiny", "prompt": "t3 t4", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    charged = 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={**server.headers(), CHARGE_HEADER: "1"}) as r:
        charged += int(r.headers[CHARGE_HEADER])
        for line in r.iter_lines():
            if line.startswith(": loragate-charge "):
                charged += int(line.rsplit(" ", 1)[1])
            if charged >= 20:
                break  # hang up mid-stream
    for _ in range(200):
        if not engine.has_unfinished:
            break
        time.sleep(0.05)
    assert not engine.has_unfinished and engine.num_generated_tokens_total - generated < 2000
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_the_router_keeps_a_tenants_limits_over_every_engine(engines, tmp_path):
    per_tenant = tmp_path / "limits.json"
    per_tenant.write_text(json.dumps({"tenant-b": {"requests_per_minute": 1}}))
    settings = GatewaySettings(role="router", engine_urls=",".join(s.url for s in engines), route_policy="round_robin",
                               api_keys="key-a=tenant-a,key-b=tenant-b", tenant_tokens_per_minute=100,
                               tenant_rate_limits_file=str(per_tenant), health_interval=60.0)
    app = build_router_app(settings)
    clock = Clock()  # stopped: the buckets change only by what is charged
    app.state.router.limits.limits.clock = clock
    with TestClient(app) as router:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="key-a", http_client=router, max_retries=0)
        spent, replicas = 0, set()
        first = router.post("/v1/completions", headers=AUTH_A, json={"model": "tiny", "prompt": "t5", "max_tokens": 2,
                                                                     "ignore_eos": True})
        spent += first.json()["usage"]["total_tokens"]
        replicas.add(first.headers[REPLICA_HEADER])
        assert first.headers["x-ratelimit-limit-tokens"] == "100" and CHARGE_HEADER not in first.headers
        assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - spent)
        # Streams are charged as the engine reports; the reports never reach the client.
        with router.stream("POST", "/v1/chat/completions", headers=AUTH_A,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "t5"}], "max_tokens": 30,
                                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
            text = r.read().decode()
            replicas.add(r.headers[REPLICA_HEADER])
        assert "loragate-charge" not in text and text.rstrip().endswith("data: [DONE]")
        spent += json.loads(text.split("\n\n")[-3][len("data: "):])["usage"]["total_tokens"]
        stream = client.responses.create(model="tiny", input="t5 t6", max_output_tokens=20, stream=True)
        spent += [e for e in stream if e.type == "response.incomplete"][0].response.usage.total_tokens  # max_output_tokens
        # Round-robin spread them over both engines; the router's bucket holds all of them.
        assert replicas == {s.url for s in engines} and spent > 50
        assert app.state.router.limits.limits._level("tenant-a", "tokens") == 100 - spent
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=60,
                                       extra_body={"ignore_eos": True})  # admitted: the bucket goes below zero
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="t5", max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded" and int(e.value.response.headers["Retry-After"]) > 0
        # tenant-b's own limit: one request a minute, refused by the router before any engine sees it.
        other = openai.OpenAI(base_url="http://testserver/v1", api_key="key-b", http_client=router, max_retries=0)
        assert other.completions.create(model="tiny", prompt="t5", max_tokens=2).choices
        with pytest.raises(openai.RateLimitError, match="limit of 1 requests per minute"):
            other.completions.create(model="tiny", prompt="t5", max_tokens=2)
        unknown = router.post("/v1/completions", headers={"Authorization": "Bearer nobody"},
                              json={"model": "tiny", "prompt": "t5", "max_tokens": 2})
        assert unknown.status_code == 401  # not limited here: the engine turns it away
        scraped = samples(router.get("/metrics").text)
        assert scraped[("loragate_rate_limited_requests", (("limit", "tokens"), ("tenant", "tenant-a")))] == 1
        assert scraped[("loragate_rate_limited_requests", (("limit", "requests"), ("tenant", "tenant-b")))] == 1
        clock.now += 60  # a minute's allowance back
        assert client.completions.create(model="tiny", prompt="t5", max_tokens=2).choices
