"""Shared adapters (--shared-adapters-tenant): one tenant's adapters every tenant may use as
"<tenant>/<name>", served exactly as the same adapter uploaded by the caller itself, listed
in everyone's /v1/models, written only by their own tenant's keys or the admin key."""

from __future__ import annotations

import httpx
import pytest

from loragate.gateway.routing_inputs import affinity_key
from loragate.gateway.vllm_metrics import served_name

from .conftest import RunningServer


def upload(s: RunningServer, adapter_dir, name: str, key: str, tenant: str | None = None) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter_dir.iterdir())]
    params = {"tenant": tenant} if tenant else None
    return httpx.post(s.url + "/v1/adapters", data={"name": name}, files=files, params=params,
                      headers=s.headers(key), timeout=30)


@pytest.fixture
def shared(tiny_llama, tmp_path, monkeypatch, save_lora):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    s.state.shared_tenant = "public"
    adapter = save_lora(tiny_llama, tmp_path / "sql", 2.0, seed=3, r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    assert upload(s, adapter, "sql", "key-admin", tenant="public").status_code == 201
    yield s, adapter
    s.stop()


def complete(s: RunningServer, model: str, key: str = "key-a") -> httpx.Response:
    body = {"model": model, "prompt": "t5 t6 t7", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}
    return httpx.post(s.url + "/v1/completions", json=body, headers=s.headers(key), timeout=60)


def test_every_tenant_uses_a_shared_adapter_as_its_own_copy_would_run(shared):
    s, adapter = shared
    assert upload(s, adapter, "mine", "key-a").status_code == 201  # the same files, tenant-a's own
    own = complete(s, "mine").json()["choices"][0]
    base = complete(s, "tiny").json()["choices"][0]
    for key in ("key-a", "key-b"):
        answer = complete(s, "public/sql", key).json()["choices"][0]
        assert answer["logprobs"]["tokens"] == own["logprobs"]["tokens"] != base["logprobs"]["tokens"]
        assert answer["logprobs"]["token_logprobs"] == pytest.approx(own["logprobs"]["token_logprobs"], abs=1e-5)
    tiny = httpx.post(s.url + "/v1/completions", headers=s.headers("key-b"), timeout=60,
                      json={"model": "tiny:public/sql", "prompt": "t5 t6 t7", "max_tokens": 12, "temperature": 0,
                            "ignore_eos": True}).json()["choices"][0]["text"]
    assert tiny == own["text"]  # vLLM's "base:adapter" form names it too


def test_shared_adapters_are_listed_for_everyone_and_written_only_by_their_owner(shared):
    s, adapter = shared
    for key in ("key-a", "key-b"):
        listed = {m["id"]: m for m in httpx.get(s.url + "/v1/models", headers=s.headers(key)).json()["data"]}
        assert listed["public/sql"]["owned_by"] == "public" and "sql" not in listed
        one = httpx.get(s.url + "/v1/models/public/sql", headers=s.headers(key))
        assert one.status_code == 200 and one.json()["id"] == "public/sql"
    # A tenant cannot reach it through the adapter routes, which are its own namespace.
    assert httpx.delete(s.url + "/v1/adapters/sql", headers=s.headers("key-a")).status_code == 404
    assert httpx.put(s.url + "/v1/adapters/public%2Fsql", headers=s.headers("key-a"),
                     files=[("file", ("x.json", b"{}"))]).status_code == 404
    assert complete(s, "public/sql").status_code == 200
    for model in ("other/sql", "public/nothing", "public/"):
        r = complete(s, model)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", model
    s.state.shared_tenant = None  # the server's setting off: nobody's adapters are shared
    assert complete(s, "public/sql").status_code == 404
    assert "public/sql" not in {m["id"] for m in httpx.get(s.url + "/v1/models", headers=s.headers()).json()["data"]}


def test_routers_and_gauges_name_a_shared_adapter_as_requests_do():
    assert affinity_key("Bearer key-a", "public/sql") == affinity_key("Bearer key-b", "tiny:public/sql")
    assert affinity_key("Bearer key-a", "sql") != affinity_key("Bearer key-b", "sql")  # each tenant's own
    assert served_name("public/sql@3", "public") == "public/sql" and served_name("team-a/sql@3", "public") == "sql"
