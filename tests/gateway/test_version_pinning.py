"""A request may pin an adapter's version, "name@N" (a canary beside the latest, or a quick
rollback): it is served exactly as that version was while it was the latest, beside the
latest in one batch, and is gone once the adapter is deleted."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import RunningServer
from .test_shared_adapters import upload


@pytest.fixture
def versions(tiny_llama, tmp_path, monkeypatch, save_lora):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    dirs = [save_lora(tiny_llama, tmp_path / f"v{seed}", 2.0, seed=seed, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj", "down_proj"]) for seed in (1, 2)]
    yield s, dirs
    s.stop()


def tokens(s: RunningServer, model: str, key: str = "key-a"):
    body = {"model": model, "prompt": "t5 t6 t7", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    r = httpx.post(s.url + "/v1/completions", json=body, headers=s.headers(key), timeout=60)
    return r.json()["choices"][0]["logprobs"]["tokens"] if r.status_code == 200 else r


def replace(s: RunningServer, name: str, adapter_dir) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter_dir.iterdir())]
    return httpx.put(s.url + f"/v1/adapters/{name}", files=files, headers=s.headers(), timeout=30)


def test_a_pinned_version_runs_as_it_did_beside_the_latest(versions):
    s, (one, two) = versions
    assert upload(s, one, "sql", "key-a").json()["version"] == 1
    first = tokens(s, "sql")
    assert replace(s, "sql", two).json()["version"] == 2
    latest = tokens(s, "sql")
    assert latest != first and tokens(s, "sql@2") == latest and tokens(s, "sql@1") == first

    async def mixed():  # both versions in the engine's batches at once
        body = {"prompt": "t5 t6 t7", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        async with httpx.AsyncClient(timeout=60) as h:
            answers = await asyncio.gather(*(h.post(s.url + "/v1/completions", json={**body, "model": m},
                                                    headers=s.headers()) for m in ("sql@1", "sql", "sql@1", "sql")))
        return [a.json()["choices"][0]["logprobs"]["tokens"] for a in answers]

    assert asyncio.run(mixed()) == [first, latest, first, latest]
    listed = httpx.get(s.url + "/v1/adapters/sql/versions", headers=s.headers()).json()["data"]
    assert [(v["version"], v["model"], v["latest"]) for v in listed] == [(1, "sql@1", False), (2, "sql@2", True)]
    assert listed[1]["sha256"] == httpx.get(s.url + "/v1/adapters/sql", headers=s.headers()).json()["sha256"]
    assert httpx.get(s.url + "/v1/adapters/sql/versions", headers=s.headers("key-b")).status_code == 404
    assert tokens(s, "sql@1", "key-b").status_code == 404  # another tenant's adapter, pinned or not


@pytest.mark.parametrize("model", ["sql@3", "sql@0", "sql@one", "sql@", "sql@1@1"])
def test_a_version_that_does_not_exist_is_a_404(versions, model):
    s, (one, _) = versions
    upload(s, one, "sql", "key-a")
    replace(s, "sql", one)  # the same files: still version 1
    r = tokens(s, model)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text


def test_deleting_an_adapter_removes_its_pinned_versions(versions):
    s, (one, two) = versions
    s.state.registry.refresh_interval = 3600  # no re-check of held versions: the delete itself must drop them
    upload(s, one, "sql", "key-a")
    replace(s, "sql", two)
    assert isinstance(tokens(s, "sql@1"), list)  # held by the registry now
    assert httpx.delete(s.url + "/v1/adapters/sql", headers=s.headers()).json()["deleted"] is True
    assert upload(s, one, "sql", "key-a").json()["version"] == 3  # versions only grow
    assert tokens(s, "sql@1").status_code == 404  # not served from what the registry held
    assert [v["version"] for v in httpx.get(s.url + "/v1/adapters/sql/versions",
                                             headers=s.headers()).json()["data"]] == [3]
    assert isinstance(tokens(s, "sql@3"), list)
