"""Router replicas sharing tenants' rate-limit buckets in Redis (gateway/shared_buckets.py,
gateway/router_limits.py): one allowance per tenant whichever router a request reaches, and a
store that is down or hangs never refuses or stalls a request. Against a real redis-server
where one is installed (Debian's), else fakeredis's TCP server (Redis's protocol; the Lua
script runs in a real Lua)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time

import openai
import pytest
from starlette.testclient import TestClient

from loragate.engine.errors import ModelConfigError
from loragate.gateway.auth import KeyStore
from loragate.gateway.errors import APIError
from loragate.gateway.rate_limits import TenantRateLimits
from loragate.gateway.router import build_router_app
from loragate.gateway.router_limits import FleetRateLimits
from loragate.gateway.settings import GatewaySettings
from loragate.gateway.shared_buckets import RedisBuckets

from .conftest import RunningServer, free_port
from .test_overload_metrics import samples

fakeredis = pytest.importorskip("fakeredis", reason="fakeredis is not installed (pip install -e '.[dev]')")
pytest.importorskip("lupa", reason="fakeredis needs lupa for Lua scripts (pip install -e '.[dev]')")

KEYS = "key-a=tenant-a,key-b=tenant-b"


@pytest.fixture
def redis_url():
    port = free_port()
    if shutil.which("redis-server"):
        process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
        process.terminate()
        process.wait(10)
        return
    server = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()
    server.server_close()


def fleet(url: str | None, requests_per_minute: int = 0, tokens_per_minute: int = 0) -> FleetRateLimits:
    shared = RedisBuckets(url) if url else None
    return FleetRateLimits(KeyStore.from_sources(None, KEYS, None),
                           TenantRateLimits(requests_per_minute, tokens_per_minute), shared)


def test_two_routers_draw_on_one_allowance(redis_url):
    async def main():
        routers = [fleet(redis_url, requests_per_minute=5), fleet(redis_url, requests_per_minute=5)]
        admitted, refused = [], []
        for i in range(8):  # alternating between the routers
            try:
                admitted.append(await routers[i % 2].admit("Bearer key-a"))
            except APIError as e:
                refused.append(e)
        assert admitted == ["tenant-a"] * 5 and len(refused) == 3  # not 5 on each
        assert all(e.status == 429 and "limit of 5 requests per minute" in e.message for e in refused)
        assert 1 <= int(refused[0].headers["Retry-After"]) <= 12
        assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
        assert await routers[1].admit("Bearer key-b") == "tenant-b"  # another tenant's own bucket
        assert await routers[0].admit("Bearer nobody") is None  # not limited here: the engine says 401
        assert [r.store_errors for r in routers] == [0, 0]
        for r in routers:
            await r.close()

    asyncio.run(main())


def test_a_charge_on_one_router_shows_on_the_other(redis_url):
    class Upstream:
        headers = {"x-loragate-charge": "40"}

    async def main():
        a, b = fleet(redis_url, tokens_per_minute=100), fleet(redis_url, tokens_per_minute=100)
        assert await a.admit("Bearer key-a") == "tenant-a"
        headers = dict(await a.response_headers("tenant-a", Upstream(), [(b"x-ratelimit-limit-tokens", b"9")]))
        assert headers == {b"x-ratelimit-limit-tokens": b"100", b"x-ratelimit-remaining-tokens": b"60"}
        b.charge("tenant-a", 70)  # a stream's report: sent without waiting for it
        await b.close()  # waits for the charges on their way
        with pytest.raises(APIError) as e:  # 100 - 40 - 70 < 1 token left
            await a.admit("Bearer key-a")
        assert "limit of 100 tokens per minute" in e.value.message
        assert int(e.value.headers["Retry-After"]) in (6, 7)  # about 11 tokens short at 100 a minute: 6.6 s
        await a.close()

    asyncio.run(main())


def test_a_streams_many_small_charges_go_to_redis_together(redis_url):
    async def main():
        router = fleet(redis_url, tokens_per_minute=10_000)
        calls = []
        apply = router.shared.apply

        async def counted(*args, **kwargs):
            calls.append(args[2])
            return await apply(*args, **kwargs)

        router.shared.apply = counted
        for _ in range(200):  # a stream's reports, one token each, faster than Redis answers
            router.charge("tenant-a", 1)
        await router.close()
        assert sum(take["tokens"] for take in calls) == 200 and len(calls) <= 3, calls
        checker = RedisBuckets(redis_url)
        levels = await checker.apply("tenant-a", {"tokens": 10_000}, {}, False)
        await checker.close()
        assert 9_800 <= levels[1]["tokens"] < 9_850  # all 200 taken, less than 0.3 s of refill since

    asyncio.run(main())


def test_a_redis_that_lost_the_script_gets_it_again():
    """After a restart or SCRIPT FLUSH, Redis no longer knows the script by its hash."""
    async def main():
        buckets = RedisBuckets("redis://unused", client=fakeredis.FakeAsyncRedis())
        assert await buckets.apply("t", {"requests": 3}, {"requests": 1}, True) == (True, {"requests": 2.0})
        await buckets.client.script_flush()
        took, levels = await buckets.apply("t", {"requests": 3}, {"requests": 1}, True)
        assert took and 1.0 <= levels["requests"] < 1.1  # refilled a little in between, never past the limit
        await buckets.close()

    asyncio.run(main())


def _silent_port():
    """A port that accepts connections and never answers (a Redis that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, listener.getsockname()[1]


@pytest.mark.parametrize("store", ["refused", "hangs"])
def test_a_store_that_is_down_or_hangs_falls_back_to_the_routers_own_buckets(store):
    listener, port = _silent_port()
    if store == "refused":
        listener.close()

    async def main():
        router = fleet(f"redis://127.0.0.1:{port}/0", requests_per_minute=2)
        start = time.monotonic()
        assert await router.admit("Bearer key-a") == "tenant-a"
        assert await router.admit("Bearer key-a") == "tenant-a"
        with pytest.raises(APIError):  # the router's own bucket still holds the limit
            await router.admit("Bearer key-a")
        elapsed = time.monotonic() - start
        assert router.store_errors == 3 and elapsed < 3 * 0.5 + 1.0, elapsed  # each call bounded by the timeout
        await router.close()

    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_settings_refuse_a_redis_url_where_it_would_do_nothing():
    with pytest.raises(ModelConfigError, match="for role 'router'"):
        GatewaySettings(rate_limit_redis_url="redis://r:6379/0")
    with pytest.raises(ModelConfigError, match="must look like") as e:
        GatewaySettings(role="router", engine_urls="http://e:8000", rate_limit_redis_url="r:6379 secret")
    assert "secret" not in str(e.value)  # a URL may hold a password: never echoed
    assert GatewaySettings(role="router", engine_urls="http://e:8000",
                           rate_limit_redis_url="rediss://:pw@r:6380/1").rate_limit_redis_url


def test_routers_in_front_of_an_engine_share_a_tenants_limits(tiny_llama, tmp_path, monkeypatch, redis_url):
    """Two router apps, one engine: tokens generated through either router count against one
    bucket, and both refuse once it is empty; /metrics counts no store errors."""
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    engine = RunningServer(tiny_llama, None)
    try:
        settings = GatewaySettings(role="router", engine_urls=engine.url, api_keys=KEYS, tenant_tokens_per_minute=60,
                                   rate_limit_redis_url=redis_url, health_interval=60.0)
        apps = [build_router_app(settings), build_router_app(settings)]
        with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
            clients = [openai.OpenAI(base_url="http://testserver/v1", api_key="key-a", http_client=h, max_retries=0)
                       for h in (one, two)]
            answer = clients[0].completions.create(model="tiny", prompt="t5", max_tokens=20,
                                                   extra_body={"ignore_eos": True})
            spent = answer.usage.total_tokens
            stream = clients[1].chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=60, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            spent += [c for c in stream if c.usage is not None][-1].usage.total_tokens
            assert spent > 80  # admitted with tokens left, then charged well past the bucket
            for _ in range(50):  # the stream's reports reach Redis without being awaited
                try:
                    clients[0].completions.create(model="tiny", prompt="t5", max_tokens=1)
                except openai.RateLimitError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the first router never saw what the second one charged")
            with pytest.raises(openai.RateLimitError, match="limit of 60 tokens per minute"):
                clients[1].completions.create(model="tiny", prompt="t5", max_tokens=1)
            for h in (one, two):
                assert samples(h.get("/metrics").text)[("loragate_router_rate_limit_store_errors", ())] == 0
    finally:
        engine.stop()
