"""SIGTERM (what Kubernetes sends after preStop) drains: the server stops accepting, finishes
the streams it has open, then exits."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from .conftest import AUTH, TinyServer, wait_until

MAX_TOKENS = 2000  # a stream of several seconds (the tiny model's context is 2048)


def test_sigterm_finishes_an_open_stream_before_exiting(tiny_llama, tmp_path):
    server = TinyServer(tiny_llama, tmp_path / "home", tmp_path / "serve.log")
    got: dict = {"tokens": 0, "events": []}
    started = threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got["events"].append(line[6:])
                        started.set()
        except httpx.HTTPError as e:
            got["error"] = repr(e)
        started.set()

    try:
        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        # It stops accepting at once, while the stream is still going.
        wait_until(lambda: _refused(server.url), "new connections to be refused", [], timeout=10)
        streamed_when_refused = len(got["events"])
        client.join(60)
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert "error" not in got, got.get("error")
    assert streamed_when_refused < MAX_TOKENS, "the stream ended before the test could see the server drain"
    assert got["events"][-1] == "[DONE]"
    assert json.loads(got["events"][-2])["usage"]["completion_tokens"] == MAX_TOKENS


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False
