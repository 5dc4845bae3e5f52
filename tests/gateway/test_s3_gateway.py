"""Two gateway servers sharing one S3 bucket (moto_server in a subprocess), each with its own
LORAGATE_HOME and so its own adapter cache: what one uploads or deletes, the other serves or
forgets; a restart with a cold cache serves what exists. Plus `loragate serve` refusing an
unusable bucket at start-up."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import httpx
import pytest

from loragate.gateway.cli import main
from loragate.gateway.server import make_loader

from .conftest import RunningServer, free_port

pytest.importorskip("boto3", reason="the S3 store needs boto3: pip install 'loragate[s3]'")
pytest.importorskip("moto", reason="these tests need moto_server: pip install 'moto[s3,server]'")

REFRESH_S = 0.5


@pytest.fixture(scope="module")
def bucket(moto_url):
    import boto3

    name = f"loragate-e2e-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3", endpoint_url=moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def start(tiny_llama, tmp_path_factory, monkeypatch_module, moto_url, bucket):
    """start(name) -> a server on the shared bucket, with a LORAGATE_HOME of its own."""
    servers = []

    def s3_loader(config, settings):
        return make_loader(config, dataclasses.replace(settings, adapter_store="s3", s3_bucket=bucket,
                                                       s3_endpoint_url=moto_url, adapter_refresh_interval=REFRESH_S))

    def start(name: str) -> RunningServer:
        home = tmp_path_factory.mktemp(f"home-{name}")
        monkeypatch_module.setenv("LORAGATE_HOME", str(home))  # read while the server starts
        server = RunningServer(tiny_llama, None, loader_factory=s3_loader)
        server.home = home
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory, save_lora) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_lora(tiny_llama, root / name, 0.3, seed=seed, r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj", "down_proj"])
            for name, seed in (("sql", 0), ("keep", 1))}


def upload(server, name: str, src: Path) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(src.iterdir())]
    return httpx.post(server.url + "/v1/adapters", data={"name": name}, files=files, headers=server.headers(),
                      timeout=60)


def chat(server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "t7 t8 t9"}],
                            "max_tokens": 8, "temperature": 0})


def listed(server) -> list[tuple[str, int]]:
    r = httpx.get(server.url + "/v1/adapters", headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return sorted((a["name"], a["version"]) for a in r.json()["data"])


def test_two_servers_share_adapters_through_s3(start, adapters):
    a, b = start("a"), start("b")
    for name in ("sql", "keep"):
        r = upload(a, name, adapters[name])
        assert r.status_code == 201, r.text

    # B never saw the uploads: the first request asks the store and downloads into B's cache.
    from_a, from_b = chat(a, "sql"), chat(b, "sql")
    assert from_a.status_code == from_b.status_code == 200, from_b.text
    text = from_a.json()["choices"][0]["message"]["content"]
    assert from_b.json()["choices"][0]["message"]["content"] == text  # greedy: the same adapter, the same tokens
    assert chat(b, "tiny").json()["choices"][0]["message"]["content"] != text  # and the adapter did apply
    assert list((b.home / "adapter-cache").rglob("tenant-a/sql/v1/adapter_model.safetensors"))
    assert listed(b) == [("keep", 1), ("sql", 1)]

    r = httpx.delete(a.url + "/v1/adapters/sql", headers=a.headers(), timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + REFRESH_S + 5
    while (r := chat(b, "sql")).status_code == 200 and time.time() < deadline:
        time.sleep(0.1)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert listed(b) == [("keep", 1)]

    b.stop()  # restarted with a cold cache: lists and serves what exists
    b2 = start("b-restarted")
    assert not (b2.home / "adapter-cache").exists() or not list((b2.home / "adapter-cache").rglob("*.safetensors"))
    assert listed(b2) == [("keep", 1)]
    keep_a, keep_b2 = chat(a, "keep"), chat(b2, "keep")
    assert keep_b2.status_code == 200, keep_b2.text
    assert keep_b2.json()["choices"][0]["message"]["content"] == keep_a.json()["choices"][0]["message"]["content"]
    assert chat(b2, "sql").status_code == 404


def test_serve_refuses_an_unusable_bucket_with_one_line(tiny_llama, moto_url, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path))
    common = ["serve", "--model", str(tiny_llama), "--port", str(free_port()), "--adapter-store", "s3"]
    assert main(common + ["--s3-bucket", "no-such-bucket", "--s3-endpoint-url", moto_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"loragate: error: adapter store: S3 bucket 'no-such-bucket' does not exist "
                   f"(s3://no-such-bucket at {moto_url}); create it first")
    assert main(common) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "loragate: error: adapter_store s3 needs a bucket: set --s3-bucket (LORAGATE_S3_BUCKET)")
