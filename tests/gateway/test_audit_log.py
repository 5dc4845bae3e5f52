"""The adapter-management audit log (--audit-log, gateway/audit.py): one JSON line per
upload, replacement, delete and runtime load/unload, refusals included, naming who acted on
which adapter, never a key."""

from __future__ import annotations

import json
import stat

import httpx
import pytest

from loragate.gateway.audit import AuditLog

from .conftest import RunningServer
from .test_shared_adapters import upload


@pytest.fixture
def audited(tiny_llama, tmp_path, monkeypatch, save_lora):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    path = tmp_path / "audit.jsonl"
    s.state.audit = AuditLog(str(path))
    adapter = save_lora(tiny_llama, tmp_path / "sql", 0.3, seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    yield s, path, adapter
    s.state.audit.close()
    s.stop()


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_management_call_leaves_one_line(audited, tmp_path, monkeypatch):
    s, path, adapter = audited
    created = upload(s, adapter, "sql", "key-a").json()
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir())]
    assert httpx.put(s.url + "/v1/adapters/sql", files=files, headers=s.headers()).status_code == 200
    refused = httpx.delete(s.url + "/v1/adapters/sql", headers={**s.headers("key-b"), "X-Request-Id": "op-7"})
    assert refused.status_code == 404  # not b's
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    assert upload(s, broken, "bad", "key-a").status_code == 422
    assert upload(s, adapter, "sql", "sk-nobody").status_code == 401
    assert upload(s, adapter, "shared", "key-admin", tenant="public").status_code == 201
    assert httpx.delete(s.url + "/v1/adapters/sql", headers=s.headers()).status_code == 200
    monkeypatch.setattr(s.app.state.settings, "allow_runtime_lora_updating", True)
    body = {"lora_name": "tenant-b/chat", "lora_path": str(adapter)}
    assert httpx.post(s.url + "/v1/load_lora_adapter", json=body, headers=s.headers("key-admin")).status_code == 200
    assert httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "tenant-b/chat"},
                      headers=s.headers("key-admin")).status_code == 200

    got = lines(path)
    summary = [(r["event"], r["outcome"], r["status"], r["actor"], r["tenant"], r["adapter"]) for r in got]
    assert summary == [
        ("adapter.create", "ok", 201, "tenant-a", "tenant-a", "sql"),
        ("adapter.replace", "ok", 200, "tenant-a", "tenant-a", "sql"),
        ("adapter.delete", "refused", 404, "tenant-b", "tenant-b", "sql"),
        ("adapter.create", "refused", 422, "tenant-a", "tenant-a", "bad"),
        ("adapter.create", "refused", 401, None, None, None),
        ("adapter.create", "ok", 201, "admin", "public", "shared"),
        ("adapter.delete", "ok", 200, "tenant-a", "tenant-a", "sql"),
        ("adapter.runtime_load", "ok", 200, "admin", "tenant-b", "chat"),
        ("adapter.runtime_unload", "ok", 200, "admin", "tenant-b", "chat"),
    ]
    assert (got[0]["version"], got[0]["sha256"]) == (created["version"], created["sha256"]) == (1, got[1]["sha256"])
    assert got[3]["error"]["code"] and "version" not in got[3]
    assert got[0]["client"] == "127.0.0.1" and got[0]["time"].endswith("+00:00")
    assert got[2]["request_id"] == "op-7" and len(got[0]["request_id"]) == 32  # the caller's, or the server's
    text = path.read_text()
    assert "key-a" not in text and "sk-nobody" not in text and "key-admin" not in text  # never a key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reads_and_inference_are_not_recorded(audited):
    s, path, adapter = audited
    upload(s, adapter, "sql", "key-a")
    httpx.get(s.url + "/v1/adapters", headers=s.headers())
    httpx.post(s.url + "/v1/completions", json={"model": "sql", "prompt": "t5", "max_tokens": 2}, headers=s.headers())
    assert [r["event"] for r in lines(path)] == ["adapter.create"]


def test_a_dash_writes_the_lines_to_stderr(capsys):
    AuditLog("-").write({"event": "adapter.delete", "outcome": "ok"})
    assert json.loads(capsys.readouterr().err) == {"event": "adapter.delete", "outcome": "ok"}
