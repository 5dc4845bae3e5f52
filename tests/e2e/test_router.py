"""A fleet of real processes: two `loragate serve --role engine` over the tiny model sharing
one LORAGATE_HOME (so one adapter store), and a `--role router` in front of them.

Shows: adapters uploaded through the router; one adapter's requests land on one engine (its
rendezvous choice) and each adapter is loaded once in the fleet; a saturated engine spills
to the other; SIGKILL of an engine mid-run ends its open streams with an error event while
new requests succeed on the survivor, and every request sent is accounted for."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from loragate.gateway.proxy import REPLICA_HEADER
from loragate.gateway.rendezvous import preference_order
from loragate.gateway.routing_inputs import affinity_key

from .conftest import ServeProcess, stop_all, wait_until

# slow: three server processes (about 20 s on two cores); it runs in CI like every test.
pytestmark = pytest.mark.slow

KEY = "key-a"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_ENGINE_LOAD = 2


class Fleet:
    def __init__(self, model_dir: Path, tmp: Path):
        env = dict(os.environ, LORAGATE_HOME=str(tmp / "home"), LORAGATE_API_KEYS="key-a=tenant-a,key-b=tenant-b",
                   LORAGATE_ADMIN_KEY="key-admin")
        engines = [ServeProcess(["--role", "engine", "--model", str(model_dir), "--dtype", "float32",
                                 "--num-threads", "1", "--max-loras", "2", "--kv-cache-memory", "64MiB"],
                                env, tmp / f"engine{i}.log") for i in range(2)]
        self.engine_urls = [e.url for e in engines]
        router = ServeProcess(["--role", "router", "--engine-urls", ",".join(self.engine_urls),
                               "--max-engine-load", str(MAX_ENGINE_LOAD), "--health-interval", "0.5"],
                              env, tmp / "router.log")
        self.url = router.url
        self.procs = [*engines, router]
        try:
            wait_until(self._is_ready, "both engines ready behind the router", self.procs)
        except BaseException:
            self.stop()  # no orphaned servers when start-up fails
            raise

    def _is_ready(self) -> bool:
        for url in self.engine_urls:  # a model that failed to load never gets ready: say why now
            error = httpx.get(url + "/readyz", timeout=2).json().get("error", {})
            if "failed to load" in error.get("message", ""):
                raise RuntimeError(f"engine {url}: {error['message']}")
        return len(httpx.get(self.url + "/readyz", timeout=2).json().get("engines", [])) == 2

    def preferred(self, model: str) -> str:
        return preference_order(affinity_key(AUTH["Authorization"], model), self.engine_urls)[0]

    def engine_metric(self, url: str, name: str) -> float:
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def router_metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def wait_until_idle(self) -> None:
        """Until the router's view of every engine is empty again: its last health check may
        still report the previous test's requests, and a request for an engine it sees full
        spills to the other."""
        deadline = time.time() + 10
        while (self.router_metric("loragate_router_replica_engine_load")
               or self.router_metric("loragate_router_replica_in_flight")):
            assert time.time() < deadline, "the router still sees requests on the engines"
            time.sleep(0.1)

    def stop(self):
        stop_all(self.procs)


@pytest.fixture(scope="module")
def fleet(tiny_llama, tmp_path_factory, save_lora):
    tmp = tmp_path_factory.mktemp("fleet")
    adapter = save_lora(tiny_llama, tmp / "adapter", 1.0, seed=0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    f = Fleet(Path(tiny_llama), tmp)
    try:
        # Two adapters preferring each engine (the ports, hence the hashes, change every run).
        names = [f"ad{i}" for i in range(64)]
        f.adapters = {url: [n for n in names if f.preferred(n) == url][:2] for url in f.engine_urls}
        files = [("file", (p.name, p.read_bytes())) for p in sorted(Path(adapter).iterdir()) if p.is_file()]
        for name in [n for pair in f.adapters.values() for n in pair]:
            r = httpx.post(f.url + "/v1/adapters", data={"name": name}, files=files, headers=AUTH, timeout=30)
            assert r.status_code == 201, r.text
        yield f
    finally:
        f.stop()


def completion(model: str, max_tokens: int = 4, **extra) -> dict:
    return {"model": model, "prompt": "t5 t6 t7", "max_tokens": max_tokens, "temperature": 0, **extra}


def test_an_adapter_sticks_to_its_engine_and_loads_once(fleet):
    misses_before = sum(fleet.engine_metric(u, "loragate_adapter_pool_misses") for u in fleet.engine_urls)
    for url, names in fleet.adapters.items():
        for name in names:
            for _ in range(3):
                r = httpx.post(fleet.url + "/v1/completions", json=completion(name), headers=AUTH, timeout=30)
                assert r.status_code == 200, r.text
                assert r.headers[REPLICA_HEADER] == url
                assert r.json()["choices"][0]["finish_reason"] == "length"
    # Four adapters, twelve requests: each adapter was loaded into a slot exactly once.
    misses = sum(fleet.engine_metric(u, "loragate_adapter_pool_misses") for u in fleet.engine_urls)
    assert misses - misses_before == 4
    # Engines authenticate: the router passes a missing key through to a 401.
    r = httpx.post(fleet.url + "/v1/completions", json=completion("ad0"), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    listing = httpx.get(fleet.url + "/v1/models", headers=AUTH, timeout=30).json()
    assert {m["id"] for m in listing["data"]} >= {n for pair in fleet.adapters.values() for n in pair}


async def _stream(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event | None = None) -> dict:
    """One streaming request: its engine, whether it completed, or the explicit error it got."""
    result = {"replica": None, "completed": False, "error": None, "tokens": 0}
    try:
        async with client.stream("POST", url + "/v1/completions", json=dict(body, stream=True), headers=AUTH) as r:
            result["replica"] = r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                result["error"] = json.loads(await r.aread())["error"]
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result["done"] = True
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    result["error"] = event["error"]
                    continue
                result["tokens"] += 1
                if started is not None:
                    started.set()
                if event["choices"][0]["finish_reason"] is not None:
                    result["completed"] = True
    except httpx.HTTPError as e:  # a silently dropped connection: the test counts it as lost
        result["transport_error"] = repr(e)
    return result


def test_a_saturated_engine_spills_to_the_other(fleet):
    name = fleet.adapters[fleet.engine_urls[0]][0]
    spills_before = fleet.router_metric("loragate_router_spills_total")

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(_stream(client, fleet.url, completion(name, 48, ignore_eos=True))
                                          for _ in range(3 * MAX_ENGINE_LOAD)))

    results = asyncio.run(burst())
    assert all(r["completed"] and r.get("done") and r["error"] is None for r in results), results
    used = {r["replica"] for r in results}
    assert used == set(fleet.engine_urls), used  # the preferred engine was full: the rest went next door
    assert fleet.router_metric("loragate_router_spills_total") > spills_before


def test_a_client_leaving_mid_stream_aborts_its_engine_request(fleet):
    engine = fleet.engine_urls[0]
    fleet.wait_until_idle()  # after the spill test's burst
    done = httpx.post(fleet.url + "/v1/completions", headers=AUTH, timeout=30,
                      json=completion(fleet.adapters[engine][0], 4))
    assert done.status_code == 200 and done.headers[REPLICA_HEADER] == engine
    finished_before = fleet.engine_metric(engine, "loragate_e2e_request_latency_seconds_count")
    assert finished_before > 0  # the metric counts finished requests
    with httpx.stream("POST", fleet.url + "/v1/completions", headers=AUTH, timeout=30,
                      json=completion(fleet.adapters[engine][0], 2000, ignore_eos=True, stream=True)) as r:
        assert r.headers[REPLICA_HEADER] == engine
        next(r.iter_lines())  # generating; then the client goes away
    deadline = time.time() + 10
    while (fleet.engine_metric(engine, "loragate_requests_running")
           or fleet.router_metric("loragate_router_replica_in_flight")):
        assert time.time() < deadline, "the engine request outlived its client"
        time.sleep(0.1)
    # Aborted, not run to its end (about 1.5 s here): a finished request would be counted.
    assert fleet.engine_metric(engine, "loragate_e2e_request_latency_seconds_count") == finished_before


def test_killing_an_engine_mid_run_loses_no_request(fleet):
    survivor, victim = fleet.engine_urls
    victim_proc = fleet.procs[1].proc
    doomed, moved = fleet.adapters[victim], fleet.adapters[survivor]

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            # Long streams open on the victim, each past its first token when the kill lands.
            flags = [asyncio.Event() for _ in range(MAX_ENGINE_LOAD)]
            open_streams = [asyncio.create_task(_stream(client, fleet.url, completion(doomed[i % 2], 1500, ignore_eos=True),
                                                        flags[i])) for i in range(MAX_ENGINE_LOAD)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
            victim_proc.send_signal(signal.SIGKILL)
            # Sent right after the kill, before any health check: those for the victim's adapters
            # either find it already ejected (its streams were cut) or fail to connect and are
            # retried on the survivor; either way none may fail.
            later = [_stream(client, fleet.url, completion(n, 8)) for n in doomed + moved for _ in range(2)]
            return await asyncio.gather(*open_streams), await asyncio.gather(*later)

    cut, later = asyncio.run(scenario())
    for r in cut:  # explicit: an error event, then [DONE]; never a silently short stream
        assert r["replica"] == victim and r.get("done") and not r["completed"], r
        assert r["error"]["code"] == "engine_unavailable" and r["tokens"] >= 1
    for r in later:
        assert r["replica"] == survivor and r["completed"] and r.get("done") and r["error"] is None, r
    sent = len(cut) + len(later)
    accounted = sum(1 for r in cut + later if r["completed"] or r["error"] is not None)
    assert accounted == sent and not any("transport_error" in r for r in cut + later)
    assert fleet.router_metric("loragate_router_stream_cuts_total") == len(cut)
    assert fleet.router_metric(f'loragate_router_ejections_total{{replica="{victim}"}}') >= 1
    assert httpx.get(fleet.url + "/readyz", timeout=5).json()["engines"] == [survivor]
