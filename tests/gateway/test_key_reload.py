"""API keys read again from their file while serving (gateway/auth.py): keys are added and
revoked without a restart, a file that does not parse leaves the keys in use, and a server
given a keys file never becomes open."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from loragate.engine.errors import ModelConfigError
from loragate.gateway import auth
from loragate.gateway.auth import OPEN_TENANT, KeyStore
from loragate.gateway.errors import APIError
from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import RunningServer
from .test_overload_metrics import samples


def tenant_of(store: KeyStore, key: str) -> str | None:
    try:
        return store.authenticate(f"Bearer {key}").tenant
    except APIError:
        return None


def test_reload_adds_and_revokes_keys_and_keeps_them_through_a_bad_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-a tenant-a\nsk-b tenant-b\n")
    store = KeyStore.from_sources(str(path), "sk-env=tenant-e", "sk-admin")
    assert store.reload() is False  # unchanged
    path.write_text("sk-b tenant-b  # sk-a revoked\nsk-c tenant-c\n")
    assert store.reload() is True
    assert [tenant_of(store, k) for k in ("sk-a", "sk-b", "sk-c", "sk-env", "sk-admin")] == [
        None, "tenant-b", "tenant-c", "tenant-e", "admin"]  # the variable's keys and the admin key stay
    for bad in ("sk-d tenant d\n", "sk-d ../escape\n"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            store.reload()
        assert tenant_of(store, "sk-c") == "tenant-c" and tenant_of(store, "sk-d") is None
    path.unlink()
    with pytest.raises(OSError):
        store.reload()
    path.write_text("")  # every key revoked: closed, not open
    assert store.reload() is True
    assert not store.is_open and tenant_of(store, "sk-b") is None and tenant_of(store, "anything") is None
    assert tenant_of(store, "sk-admin") == "admin"


def test_a_file_being_rewritten_in_place_is_taken_once_it_holds_still(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-a tenant-a\nsk-b tenant-b\n")
    store = KeyStore.from_sources(str(path), None, None)
    path.write_text("")  # `cat > keys` has truncated it; the rest comes 50 ms later
    writer = threading.Timer(0.05, path.write_text, ("sk-a tenant-a\nsk-c tenant-c\n",))
    writer.start()
    assert store.reload() is False  # the empty read was not taken: it changed under the second read
    writer.join()
    assert tenant_of(store, "sk-b") == "tenant-b"
    assert store.reload() is True
    assert [tenant_of(store, k) for k in ("sk-a", "sk-b", "sk-c")] == ["tenant-a", None, "tenant-c"]


@pytest.fixture
def keyed(tiny_llama, tmp_path, monkeypatch):
    """A server whose keys file holds sk-a for tenant-a, read again every 50 ms."""
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(auth, "KEYS_RELOAD_SECONDS", 0.05)
    path = tmp_path / "keys"
    path.write_text("sk-a tenant-a\n")
    s = RunningServer(tiny_llama, None, keys=KeyStore.from_sources(str(path), None, None))
    yield s, path
    s.stop()


def replace(path, text: str) -> None:
    """Write the keys file as operators must while a server reads it: whole, by a rename (a
    write in place can be read half-done, here with a reload every 50 ms)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.replace(path)


def eventually(check) -> bool:
    for _ in range(100):
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_running_server_takes_new_keys_and_drops_revoked_ones(keyed):
    s, path = keyed

    def status(key):
        return httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    assert (status("sk-a"), status("sk-c")) == (200, 401)
    replace(path, "sk-c tenant-c\n")  # sk-a leaked: revoked, sk-c issued
    assert eventually(lambda: (status("sk-a"), status("sk-c")) == (401, 200))
    replace(path, "sk-c tenant c\n")  # a typo: the keys in use stay
    assert eventually(lambda: samples(httpx.get(s.url + "/metrics").text).get(
        ("loragate_api_keys_reload_errors", ()), 0) >= 1)
    assert status("sk-c") == 200
    assert samples(httpx.get(s.url + "/metrics").text)[("loragate_api_keys", ())] == 1


def test_a_router_keeps_limits_for_a_tenant_added_while_it_runs(keyed):
    """The router reads the same keys file to know whose requests it limits."""
    s, path = keyed
    settings = GatewaySettings(role="router", engine_urls=s.url, api_keys_file=str(path),
                               tenant_requests_per_minute=1, health_interval=60.0)
    body = {"model": "tiny", "prompt": "t5", "max_tokens": 1}
    new = {"Authorization": "Bearer sk-new"}
    app = build_router_app(settings)
    with TestClient(app) as router:
        replace(path, "sk-a tenant-a\nsk-new tenant-new\n")
        assert eventually(lambda: tenant_of(app.state.router.limits.keys, "sk-new") == "tenant-new")
        assert eventually(lambda: tenant_of(s.state.keys, "sk-new") == "tenant-new")  # the engine's too
        assert router.post("/v1/completions", headers=new, json=body).status_code == 200
        refused = router.post("/v1/completions", headers=new, json=body)
        assert refused.status_code == 429 and "tenant 'tenant-new'" in refused.json()["error"]["message"]


def test_vllms_single_api_key_is_the_default_tenants():
    """--api-key (vLLM's flag, alone or beside tenants' keys): its callers are tenant "default",
    as an open server's are; other keys keep their tenants, and a missing key is refused."""
    from loragate.gateway.cli import build_parser
    from loragate.gateway.config_flags import dataclass_from_args

    args = build_parser().parse_args(["serve", "--api-key", "sk-vllm", "--api-keys", "key-a=tenant-a"])
    settings = dataclass_from_args(GatewaySettings, args)
    keys = KeyStore.from_sources(None, settings.key_entries(), None)
    assert keys.authenticate("Bearer sk-vllm").tenant == OPEN_TENANT
    assert keys.authenticate("Bearer key-a").tenant == "tenant-a"
    with pytest.raises(APIError) as refused:
        keys.authenticate(None)
    assert refused.value.status == 401
    for bad in ("", "two words", "k=v"):
        with pytest.raises(ModelConfigError, match="api_key"):
            GatewaySettings(api_key=bad)
