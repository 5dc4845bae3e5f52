"""Per-tenant requests and tokens per minute (gateway/rate_limits.py): token buckets, 429s
that say when to retry, tokens charged as they are counted, batch lines exempt."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from loragate.gateway.errors import APIError
from loragate.gateway.rate_limits import TenantRateLimits
from loragate.gateway.settings import GatewaySettings
from loragate.engine.errors import ModelConfigError

from .conftest import RunningServer
from .test_batches import content_lines, line, run_batch
from .test_key_shares import Clock
from .test_overload_metrics import samples


def test_requests_per_minute_refill_continuously_and_tenants_are_apart():
    clock = Clock()
    limits = TenantRateLimits(requests_per_minute=2, clock=clock)
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(APIError) as e:
        limits.admit("a")
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.headers["Retry-After"] == "30" and e.value.headers["retry-after-ms"] == "30000"
    assert e.value.headers["x-ratelimit-limit-requests"] == "2"
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    limits.admit("b")  # another tenant's bucket
    clock.now += 29.9
    with pytest.raises(APIError):
        limits.admit("a")
    clock.now += 0.1  # half a minute: one request back
    limits.admit("a")
    clock.now += 3600  # a bucket holds at most a minute's allowance
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(APIError):
        limits.admit("a")
    assert limits.refused == {("a", "requests"): 3}


def test_tokens_are_taken_as_counted_and_the_debt_delays_the_next_request():
    clock = Clock()
    limits = TenantRateLimits(tokens_per_minute=100, clock=clock)
    limits.admit("a")
    limits.take("a", "tokens", 150)  # an admitted request is never cut short: the bucket goes below zero
    with pytest.raises(APIError) as e:
        limits.admit("a")
    assert e.value.headers["Retry-After"] == "31"  # 51 tokens at 100 a minute: 30.6 s
    assert "over its limit of 100 tokens per minute; retry in 30.6 s" in e.value.message
    clock.now += 31
    limits.admit("a")
    assert limits.refused == {("a", "tokens"): 1}
    TenantRateLimits().admit("a")  # no limits: nothing counted
    for name in ("tenant_requests_per_minute", "tenant_tokens_per_minute"):
        with pytest.raises(ModelConfigError, match=f"{name} must be >= 0"):
            GatewaySettings(**{name: -1})


def test_a_tenants_own_limits_replace_the_defaults(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"paid": {"requests_per_minute": 0, "tokens_per_minute": 500},
                                "trial": {"requests_per_minute": 1}}))
    per_tenant = GatewaySettings(tenant_rate_limits_file=str(path)).tenant_limits()
    assert per_tenant == {"paid": {"requests": 0, "tokens": 500}, "trial": {"requests": 1}}
    limits = TenantRateLimits(requests_per_minute=2, tokens_per_minute=100, clock=Clock(), per_tenant=per_tenant)
    for _ in range(5):
        limits.admit("paid")  # no request limit of its own
    assert limits.headers("paid") == {"x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "500"}
    limits.admit("trial")
    with pytest.raises(APIError, match="limit of 1 requests per minute"):
        limits.admit("trial")
    assert limits.headers("trial")["x-ratelimit-limit-tokens"] == "100"  # the default where it sets none
    limits.admit("anyone")
    limits.admit("anyone")
    with pytest.raises(APIError, match="limit of 2 requests per minute"):
        limits.admit("anyone")
    for content, message in (("[1]", "must be a JSON object"), ('{"a": {"tokens_per_minute": -1}}', "integers >= 0"),
                             ('{"a": {"tpm": 5}}', "needs requests_per_minute"), ("{", "Expecting")):
        path.write_text(content)
        with pytest.raises(ModelConfigError, match=message):
            GatewaySettings(tenant_rate_limits_file=str(path)).tenant_limits()


def test_a_tenant_over_its_tokens_is_answered_429_until_the_bucket_refills(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    clock = Clock()  # stopped: the bucket changes only by what is charged, until the test moves it
    s.state.rate_limits = TenantRateLimits(tokens_per_minute=60, clock=clock)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="key-a", max_retries=0)
        first = httpx.post(s.url + "/v1/completions", headers=s.headers(),
                           json={"model": "tiny", "prompt": "t5", "max_tokens": 2, "ignore_eos": True})
        assert first.headers["x-ratelimit-limit-tokens"] == "60"
        assert first.headers["x-ratelimit-remaining-tokens"] == "57"  # what is left after it: 1 + 2 taken
        assert "x-ratelimit-limit-requests" not in first.headers  # no request limit set
        # 4 prompt tokens + 40 generated (streamed: charged as they come), then a chat of 3 + 20.
        stream = client.completions.create(model="tiny", prompt="t5 t6 t7 t8", max_tokens=40, temperature=0,
                                           extra_body={"ignore_eos": True}, stream=True)
        assert sum(1 for _ in stream)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=20,
                                       extra_body={"ignore_eos": True})
        assert s.state.rate_limits._level("tenant-a", "tokens") == 57 - 4 - 40 - 3 - 20
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="t5", max_tokens=2)
        headers = e.value.response.headers
        assert headers["x-ratelimit-limit-tokens"] == "60" and headers["Retry-After"] == "11"
        assert e.value.body["code"] == "rate_limit_exceeded"
        r = httpx.post(s.url + "/v1/responses", headers=s.headers(), json={"model": "tiny", "input": "t5"})
        assert r.status_code == 429
        other = openai.OpenAI(base_url=s.url + "/v1", api_key="key-b", max_retries=0)
        assert other.completions.create(model="tiny", prompt="t5", max_tokens=2).choices  # tenant-b's own bucket
        # A batch line runs regardless, and is not charged.
        batch = run_batch(s, [line("q", {"model": "tiny", "prompt": "t5 t6", "max_tokens": 30, "ignore_eos": True})])
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1
        assert content_lines(s, batch["output_file_id"])[0]["response"]["body"]["usage"]["total_tokens"] == 32
        assert s.state.rate_limits._level("tenant-a", "tokens") == -10
        scraped = samples(httpx.get(s.url + "/metrics").text)
        assert scraped[("loragate_rate_limited_requests", (("limit", "tokens"), ("tenant", "tenant-a")))] == 2
        clock.now += 11  # refilled to 1 token
        assert client.completions.create(model="tiny", prompt="t5", max_tokens=2).choices
    finally:
        s.stop()
