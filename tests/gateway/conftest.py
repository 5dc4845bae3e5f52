"""A real HTTP server on loopback (uvicorn in a thread) over the tiny model, with tenants."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from loragate.engine import EngineConfig
from loragate.gateway.app import build_app
from loragate.gateway.auth import KeyStore
from loragate.gateway.server import make_loader
from loragate.gateway.settings import GatewaySettings
from loragate.gateway.state import ServerState

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
ADMIN = "key-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model_dir, home, max_waiting=256, max_num_seqs=32, load_async=False, max_upload=2 << 30,
                 loader_factory=make_loader, max_tenant_requests=0, keys=None, tracing=None, served="tiny",
                 **engine_fields):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = GatewaySettings(port=self.port, max_waiting_requests=max_waiting, served_model_name=served,
                                   max_upload_size=max_upload)
        # A tiny model's KV is 512 bytes a token: 64 MiB holds 131k tokens. The default 1 GiB,
        # written at start, stayed resident per server until its module ended (the suite peaked
        # at 18 GB of the machine's 24).
        engine_fields.setdefault("kv_cache_memory", "64MiB")
        config = EngineConfig(model=str(model_dir), dtype="float32", max_loras=4, max_num_seqs=max_num_seqs,
                              **engine_fields)
        self.state = ServerState(keys=keys or KeyStore(KEYS, ADMIN), max_waiting=max_waiting,
                                 max_tenant_requests=max_tenant_requests)
        loader = loader_factory(config, settings)
        if not load_async:
            loader(self.state)
        self.app = build_app(self.state, loader if load_async else None, tracing)
        self.app.state.settings = settings
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def headers(self, key="key-a") -> dict:
        return {"Authorization": f"Bearer {key}"}

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.state.engine is not None:
            self.state.engine.shutdown()


def drop_a_stream(s: RunningServer, prompt: str = "t9") -> None:
    """Open a 1000-token completion stream, read its first line and hang up; return once the
    engine has ended every request."""
    async def drop():
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=60) as h:
            async with h.stream("POST", s.url + "/v1/completions", json=body, headers=s.headers()) as r:
                await anext(r.aiter_lines())

    asyncio.run(drop())
    wait_until_idle(s.state.engine.engine)


def wait_until_idle(engine, seconds: float = 10.0) -> None:
    """Return once `engine` has no request left (aborted ones end at its next step)."""
    deadline = time.monotonic() + seconds
    while engine.has_unfinished:
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine still has requests after {seconds} s")
        time.sleep(0.05)


def _module_server(model_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("LORAGATE_HOME", str(tmp_path_factory.mktemp("home")))
    s = RunningServer(model_dir, None)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, monkeypatch_module):
    yield from _module_server(tiny_llama, tmp_path_factory, monkeypatch_module)


@pytest.fixture(scope="module")
def real_server(real_model_dir, tmp_path_factory, monkeypatch_module):
    """The same server over the real bundled SmolLM2 (fp32)."""
    yield from _module_server(real_model_dir, tmp_path_factory, monkeypatch_module)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
