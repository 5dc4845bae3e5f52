"""vLLM's runtime LoRA API (gateway/runtime_lora_api.py): off unless enabled; with keys, the
admin key only, naming the tenant; stores a server directory as --lora-modules does, and the
adapter is then served to that tenant alone; errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import pytest

from loragate.gateway.auth import KeyStore

from .conftest import ADMIN


def post(server, path: str, body, key: str = ADMIN) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers(key), timeout=60)


def complete(server, model: str, key: str = "key-a") -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=server.headers(key), timeout=30,
                      json={"model": model, "prompt": "t5 t6 t7", "max_tokens": 6, "temperature": 0})


@pytest.fixture
def enabled(server, monkeypatch):
    monkeypatch.setattr(server.app.state.settings, "allow_runtime_lora_updating", True)
    return server


@pytest.fixture
def adapters(tiny_llama, tmp_path, save_lora):
    return [save_lora(tiny_llama, tmp_path / f"lora{i}", 0.3, seed=i, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj"]) for i in range(2)]


def test_off_unless_enabled(server, adapters):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "tenant-a/x", "lora_path": str(adapters[0])})
    assert r.status_code == 404 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]


def test_load_serve_replace_and_unload(enabled, adapters):
    s = enabled
    body = {"lora_name": "tenant-a/rt", "lora_path": str(adapters[0])}
    r = post(s, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'rt' added successfully.", r.text
    first = complete(s, "rt")
    assert first.status_code == 200 and complete(s, "rt", key="key-b").status_code == 404  # tenant-a's alone
    assert httpx.get(s.url + "/v1/adapters/rt", headers=s.headers()).json()["version"] == 1

    r = post(s, "/v1/load_lora_adapter", dict(body, lora_path=str(adapters[1])))
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_exists"
    r = post(s, "/v1/load_lora_adapter", dict(body, lora_path=str(adapters[1]), load_inplace=True))
    assert r.status_code == 200, r.text
    assert httpx.get(s.url + "/v1/adapters/rt", headers=s.headers()).json()["version"] == 2
    assert complete(s, "rt").json()["choices"][0]["text"] != first.json()["choices"][0]["text"]

    r = post(s, "/v1/unload_lora_adapter", {"lora_name": "tenant-a/rt"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'rt' removed successfully."
    assert complete(s, "rt").status_code == 404
    r = post(s, "/v1/unload_lora_adapter", {"lora_name": "tenant-a/rt"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


@pytest.mark.parametrize("key, body, status, param", [
    ("key-a", {"lora_name": "tenant-a/x", "lora_path": "ADAPTER"}, 403, None),  # a tenant could take another's dir
    (ADMIN, {"lora_name": "x", "lora_path": "ADAPTER"}, 400, "lora_name"),  # which tenant?
    (ADMIN, {"lora_name": "tenant-a/bad name", "lora_path": "ADAPTER"}, 400, "lora_name"),
    (ADMIN, {"lora_name": "tenant-a/x=y", "lora_path": "ADAPTER"}, 400, "lora_name"),
    (ADMIN, {"lora_path": "ADAPTER"}, 400, "lora_name"),
    (ADMIN, {"lora_name": "tenant-a/x"}, 400, "lora_path"),
    (ADMIN, {"lora_name": "tenant-a/x", "lora_path": "/nonexistent"}, 400, "lora_path"),
    (ADMIN, {"lora_name": "tenant-a/x", "lora_path": "/" + "x" * 5000}, 400, "lora_path"),  # too long a name
    (ADMIN, {"lora_name": "tenant-a/x", "lora_path": "ADAPTER", "load_inplace": "yes"}, 400, "load_inplace"),
    (ADMIN, ["tenant-a/x"], 400, "body"),
])
def test_bad_calls_are_refused_in_openai_shape(enabled, adapters, key, body, status, param):
    if isinstance(body, dict) and body.get("lora_path") == "ADAPTER":
        body = dict(body, lora_path=str(adapters[0]))
    r = post(enabled, "/v1/load_lora_adapter", body, key=key)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert httpx.get(enabled.url + "/v1/adapters/x", headers=enabled.headers()).status_code == 404  # nothing stored


def test_a_directory_that_is_not_a_valid_adapter_stores_nothing(enabled, adapters):
    (adapters[0] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    r = post(enabled, "/v1/load_lora_adapter", {"lora_name": "tenant-a/broken", "lora_path": str(adapters[0])})
    assert r.status_code == 422 and str(adapters[0]) in r.json()["error"]["message"]
    assert httpx.get(enabled.url + "/v1/adapters/broken", headers=enabled.headers()).status_code == 404


def test_an_unreadable_file_is_refused(enabled, adapters, monkeypatch):
    import shutil

    def unreadable(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(shutil, "copyfile", unreadable)
    r = post(enabled, "/v1/load_lora_adapter", {"lora_name": "tenant-a/locked", "lora_path": str(adapters[0])})
    assert r.status_code == 422 and "Permission denied" in r.json()["error"]["message"], r.text


def test_the_quota_applies_and_an_open_server_needs_no_tenant(enabled, adapters, monkeypatch):
    monkeypatch.setattr(enabled.app.state.settings, "max_adapters_per_tenant", 1)
    def load(name, adapter):
        return post(enabled, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter)})
    assert load("tenant-b/one", adapters[0]).status_code == 200
    r = load("tenant-b/two", adapters[1])
    assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_quota"
    assert post(enabled, "/v1/unload_lora_adapter", {"lora_name": "tenant-b/one"}).status_code == 200

    monkeypatch.setattr(enabled.state, "keys", KeyStore({}))  # no keys: every caller is tenant "default"
    assert load("open", adapters[0]).status_code == 200
    assert complete(enabled, "open").status_code == 200
    assert post(enabled, "/v1/unload_lora_adapter", {"lora_name": "open"}).status_code == 200
