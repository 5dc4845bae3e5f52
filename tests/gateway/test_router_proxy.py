"""The router app in-process over fake engines (httpx.MockTransport): affinity, retries,
ejection and re-admission, cut streams and bodies, forwarding, and the 503 with no engine."""

from __future__ import annotations

import importlib.metadata
import json
import time

import httpx
import pytest
from starlette.testclient import TestClient

from loragate.gateway.charges import CHARGE_HEADER
from loragate.gateway.proxy import REPLICA_HEADER
from loragate.gateway.rendezvous import preference_order
from loragate.gateway.router import build_router_app
from loragate.gateway.routing_inputs import affinity_key
from loragate.gateway.settings import GatewaySettings

E1, E2 = "http://e1:8000", "http://e2:8000"
AUTH = {"Authorization": "Bearer key-a"}
DONE = b"data: [DONE]\n\n"


class ChunkStream(httpx.AsyncByteStream):
    """Yields chunks, then raises `error` (an engine that died mid-response) if given."""

    def __init__(self, chunks, error=None):
        self.chunks, self.error = chunks, error

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


def json_response(status: int, obj) -> httpx.Response:
    # A stream, as from a real socket (a Response built from bytes counts as already read).
    return httpx.Response(status, headers={"content-type": "application/json", "x-request-id": "the-engines"},
                          stream=ChunkStream([json.dumps(obj).encode()]))


class FakeEngines:
    def __init__(self):
        self.mode = {E1: "ok", E2: "ok"}
        self.engine_load = {E1: 0, E2: 0}  # requests running in each, as its /readyz says
        self.calls: list[tuple[str, str, str, dict, bytes]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"http://{request.url.host}:{request.url.port}"
        mode = self.mode[base]
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/readyz":
            return json_response(503 if mode == "not_ready" else 200,
                                 {"load": {"running": self.engine_load[base], "waiting": 0}})
        body = await request.aread()
        self.calls.append((base, request.method, str(request.url.raw_path, "ascii"), dict(request.headers), body))
        cut = httpx.RemoteProtocolError("peer closed connection", request=request)
        if mode in ("503", "500"):
            return json_response(int(mode), {"error": {"message": mode, "type": "server_error", "param": None,
                                                       "code": None}})
        if mode == "cut_body":
            return httpx.Response(200, headers={"content-type": "application/json", "content-length": "500"},
                                  stream=ChunkStream([b'{"id": "cmpl-1", "cho'], cut))
        inference = "completions" in request.url.path or request.url.path in ("/v1/responses", "/v1/messages")
        is_stream = inference and json.loads(body).get("stream") is True
        response_id = f"resp_{len(self.calls)}_{base[7:9]}"  # a response object's id names its engine
        if not is_stream:
            return json_response(200, {"engine": base, "path": request.url.path, "id": response_id})
        if request.url.path == "/v1/responses":  # event-typed SSE, ending with response.completed
            created = json.dumps({"type": "response.created", "sequence_number": 0, "response": {"id": response_id}})
            events = [b"event: response.created\ndata: " + created.encode() + b"\n\nevent: response.output_text",
                      b'.delta\ndata: {"sequence_number": 1}\n\n']
            end = [] if mode != "ok" else [b'event: response.completed\ndata: {"sequence_number": 2}\n\n']
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=ChunkStream(events + end, cut if mode == "cut_stream" else None))
        if request.url.path == "/v1/messages":  # Anthropic's events, ending with message_stop
            events = [b'event: message_start\ndata: {"type": "message_start"}\n\nevent: content_block',
                      b'_start\ndata: {"type": "content_block_start"}\n\n']
            end = [] if mode != "ok" else [b'event: message_stop\ndata: {"type": "message_stop"}\n\n']
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=ChunkStream(events + end, cut if mode == "cut_stream" else None))
        events = [b'data: {"n": 1}\n\ndata: {"n"', b': 2}\n\n']
        if mode == "cut_stream":  # dies in the middle of the third event
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=ChunkStream(events + [b'data: {"n": '], cut))
        if mode == "no_done":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=ChunkStream(events))
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=ChunkStream(events + [DONE]))

    def inference_calls(self):
        return [c for c in self.calls if c[2].startswith("/v1/") and "completions" in c[2]]


@pytest.fixture
def engines():
    return FakeEngines()


def make_client(engines, **settings):
    settings = GatewaySettings(role="router", engine_urls=f"{E1},{E2}", **{"health_interval": 60.0, **settings})
    transport_client = httpx.AsyncClient(transport=httpx.MockTransport(engines))
    return TestClient(build_router_app(settings, client=transport_client))


def preferred(model: str, auth=AUTH["Authorization"]) -> list[str]:
    return preference_order(affinity_key(auth, model), [E1, E2])


def model_preferring(url: str) -> str:
    return next(m for m in (f"adapter{i}" for i in range(100)) if preferred(m)[0] == url)


def metric(client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_requests_for_one_adapter_stick_to_its_engine(engines):
    with make_client(engines) as client:
        assert client.get("/readyz").json()["engines"] == [E1, E2]
        for url in (E1, E2):
            model = model_preferring(url)
            for form in (model, f"base:{model}"):  # both spellings name one adapter
                r = client.post("/v1/completions", json={"model": form, "prompt": "x"}, headers=AUTH)
                assert r.status_code == 200 and r.headers[REPLICA_HEADER] == url and r.json()["engine"] == url
            r = client.post("/v1/embeddings", json={"model": model, "input": "x"}, headers=AUTH)
            assert r.headers[REPLICA_HEADER] == url and r.json()["path"] == "/v1/embeddings"
        # The tenant is part of the key: another caller's same-named adapter is another key.
        assert affinity_key("Bearer key-a", "m") != affinity_key("Bearer key-b", "m")
        sent = engines.inference_calls()[0]
        assert sent[3]["authorization"] == "Bearer key-a" and sent[3]["accept-encoding"] == "identity"


def test_an_engine_busy_with_other_routers_requests_spills_like_one_busy_with_ours(engines):
    """Routers sharing engines see each other's load in the engines' /readyz."""
    model = model_preferring(E1)
    engines.engine_load[E1] = 40  # another router's requests
    with make_client(engines, max_engine_load=8) as client:
        assert client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH).headers[
            REPLICA_HEADER] == E2
        assert metric(client, "loragate_router_spills_total") == 1
        assert metric(client, 'loragate_router_replica_engine_load{replica="http://e1:8000"}') == 40
    engines.engine_load[E1] = 3
    with make_client(engines, max_engine_load=8) as client:
        assert client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH).headers[
            REPLICA_HEADER] == E1


def test_connection_error_ejects_and_retries_on_the_other_engine(engines):
    with make_client(engines) as client:
        model = model_preferring(E1)
        engines.mode[E1] = "down"
        r = client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == E2
        assert metric(client, 'loragate_router_retries_total{reason="connection_error"}') == 1
        assert metric(client, f'loragate_router_ejections_total{{replica="{E1}"}}') == 1
        assert metric(client, f'loragate_router_replica_healthy{{replica="{E1}"}}') == 0
        # Ejected: the next request goes straight to E2, no retry.
        client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
        assert metric(client, "loragate_router_retries_total") == 1


def test_a_503_is_retried_once_and_ejects_a_500_is_passed_through(engines):
    with make_client(engines) as client:
        model = model_preferring(E1)
        engines.mode[E1] = "503"
        r = client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == E2
        assert client.get("/readyz").json()["engines"] == [E2]
        engines.mode[E2] = "500"
        engines.calls.clear()
        r = client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
        assert r.status_code == 500 and r.json()["error"]["message"] == "500"  # the only engine's own answer
        assert len(engines.inference_calls()) == 1


def test_both_engines_failing_is_one_retry_then_the_second_answer(engines):
    with make_client(engines) as client:
        engines.mode.update({E1: "500", E2: "500"})
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
        assert r.status_code == 500 and len(engines.inference_calls()) == 2


def _events(response) -> list[str]:
    return [e for e in response.text.split("\n\n") if e]


def test_stream_is_relayed_whole(engines):
    with make_client(engines) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True}, headers=AUTH)
        assert r.headers["content-type"].startswith("text/event-stream")
        assert _events(r) == ['data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]


@pytest.mark.parametrize("mode", ["cut_stream", "no_done"])
def test_a_stream_cut_mid_way_ends_with_an_error_event(engines, mode):
    with make_client(engines) as client:
        model = model_preferring(E1)
        engines.mode[E1] = mode
        r = client.post("/v1/completions", json={"model": model, "prompt": "x", "stream": True}, headers=AUTH)
        events = _events(r)
        # Whole events only (the half-sent third one is dropped), then an error, then [DONE].
        assert events[:2] == ['data: {"n": 1}', 'data: {"n": 2}'] and events[-1] == "data: [DONE]"
        assert len(events) == 4
        error = json.loads(events[2][len("data: "):])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert metric(client, f'loragate_router_stream_cuts_total{{replica="{E1}"}}') == 1
        # A connection lost mid-stream ejects the engine; a stream that merely lacks [DONE] does not.
        assert (E1 in client.get("/readyz").json()["engines"]) == (mode == "no_done")


@pytest.mark.parametrize("mode", ["ok", "cut_stream", "no_done"])
def test_a_responses_stream_is_relayed_and_a_cut_one_ends_with_its_error_event(engines, mode):
    with make_client(engines) as client:
        model = model_preferring(E1)
        engines.mode[E1] = mode
        r = client.post("/v1/responses", json={"model": model, "input": "x", "stream": True}, headers=AUTH)
        events = _events(r)
        created = json.loads(events[0].split("\ndata: ")[1])
        assert events[0].startswith("event: response.created\n") and created["sequence_number"] == 0
        assert events[1] == 'event: response.output_text.delta\ndata: {"sequence_number": 1}'
        assert len(events) == 3  # no [DONE]: the Responses stream ends with its final event
        if mode == "ok":
            assert events[2].startswith("event: response.completed")
            return
        kind, data = events[2].split("\n")
        error = json.loads(data[len("data: "):])
        assert kind == "event: error" and error["type"] == "error" and error["code"] == "engine_unavailable"
        assert error["sequence_number"] == 2
        assert metric(client, f'loragate_router_stream_cuts_total{{replica="{E1}"}}') == 1


@pytest.mark.parametrize("mode", ["ok", "cut_stream", "no_done"])
def test_a_messages_stream_is_relayed_and_a_cut_one_ends_with_anthropics_error_event(engines, mode):
    with make_client(engines) as client:
        model = model_preferring(E1)
        engines.mode[E1] = mode
        r = client.post("/v1/messages", json={"model": model, "max_tokens": 4, "messages": [], "stream": True},
                        headers={"x-api-key": "key-a"})
        events = _events(r)
        assert r.headers[REPLICA_HEADER] == E1  # the key in x-api-key: the same affinity as a bearer token
        assert engines.calls[-1][3]["x-api-key"] == "key-a"
        assert [e.split("\n")[0] for e in events[:2]] == ["event: message_start", "event: content_block_start"]
        assert len(events) == 3  # no [DONE]: the Messages stream ends with message_stop
        if mode == "ok":
            assert events[2].startswith("event: message_stop")
            assert metric(client, "loragate_router_stream_cuts_total") == 0
            return
        kind, data = events[2].split("\n")
        assert kind == "event: error" and json.loads(data[len("data: "):])["error"]["type"] == "api_error"
        assert metric(client, f'loragate_router_stream_cuts_total{{replica="{E1}"}}') == 1


def test_the_request_id_is_passed_to_the_engine_and_answered_once(engines):
    with make_client(engines) as client:
        for sent in ({"X-Request-Id": "abc-1"}, {}):
            r = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers={**AUTH, **sent})
            got = r.headers.get_list("x-request-id")
            assert len(got) == 1 and got[0] == sent.get("X-Request-Id", got[0])
            assert engines.calls[-1][3]["x-request-id"] == got[0]  # the engine's logs name the same request
        assert len(got[0]) == 32


def test_the_routers_own_errors_on_the_messages_api_have_anthropics_shape(engines):
    with make_client(engines) as client:
        engines.mode[E1] = engines.mode[E2] = "down"
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
        r = client.post("/v1/messages", json=body, headers={"x-api-key": "key-a"})
        assert r.status_code == 503 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "overloaded_error"
        assert client.post("/v1/chat/completions", json=body, headers=AUTH).json()["error"]["code"]  # OpenAI's


def test_a_non_streamed_body_cut_mid_way_is_a_502(engines):
    with make_client(engines) as client:
        engines.mode[E1] = engines.mode[E2] = "cut_body"
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_no_engine_is_a_503_with_retry_after(engines):
    engines.mode.update({E1: "not_ready", E2: "down"})
    with make_client(engines, health_interval=2.5) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "3"
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "no_replica"
        assert metric(client, "loragate_router_unavailable_total") == 1
        assert client.get("/v1/models", headers=AUTH).status_code == 503


def test_a_recovered_engine_is_readmitted_by_the_health_check(engines):
    engines.mode[E1] = "not_ready"
    with make_client(engines, health_interval=0.05) as client:
        assert client.get("/readyz").json()["engines"] == [E2]
        engines.mode[E1] = "ok"
        deadline = time.time() + 5
        while E1 not in client.get("/readyz").json()["engines"]:
            assert time.time() < deadline, "E1 never came back"
            time.sleep(0.05)


def test_other_v1_calls_go_to_the_first_healthy_engine_with_the_body_intact(engines):
    payload = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
    with make_client(engines) as client:
        for _ in range(3):
            r = client.post("/v1/adapters?tenant=x", content=payload, headers={**AUTH, "content-type": "application/x-tar"})
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == E1
        base, method, path, headers, body = engines.calls[-1]
        assert (base, method, path) == (E1, "POST", "/v1/adapters?tenant=x")
        assert body == payload and headers["content-length"] == str(len(payload))
        assert headers["authorization"] == "Bearer key-a" and "x-forwarded-for" in headers
        assert client.delete("/v1/files/file-1", headers=AUTH).headers[REPLICA_HEADER] == E1
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
            assert client.request(method, path, headers=AUTH).headers[REPLICA_HEADER] == E1
            assert engines.calls[-1][1:3] == (method, path)
        engines.mode[E1] = "down"  # unreachable before it saw the body: the next engine takes it
        r = client.get("/v1/models", headers=AUTH)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == E2


def test_an_oversized_inference_body_is_a_413(engines, monkeypatch):
    monkeypatch.setattr("loragate.gateway.router.MAX_INFERENCE_BODY", 1000)
    with make_client(engines) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000}, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert engines.calls == []


def test_only_a_router_keeping_rate_limits_asks_engines_for_charge_reports(engines):
    body = {"model": "m", "prompt": "x"}
    with make_client(engines) as client:  # no limits: a client's own ask is not passed on either
        client.post("/v1/completions", json=body, headers={**AUTH, CHARGE_HEADER: "1"})
        assert CHARGE_HEADER not in engines.calls[-1][3]
    with make_client(engines, tenant_requests_per_minute=5) as client:
        client.post("/v1/completions", json=body, headers=AUTH)
        assert engines.calls[-1][3][CHARGE_HEADER] == "1"


def test_forwarded_paths_keep_their_escapes_and_headers_are_not_doubled(engines):
    with make_client(engines) as client:
        r = client.get("/v1/adapters/a%2Fb%20c?tenant=t", headers=AUTH)
        assert engines.calls[-1][2] == "/v1/adapters/a%2Fb%20c?tenant=t"
        assert len(r.headers.get_list("content-type")) == 1 and len(r.headers.get_list(REPLICA_HEADER)) == 1


def test_unknown_paths_answer_in_openai_shape(engines):
    with make_client(engines) as client:
        r = client.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert client.get("/healthz").json() == {"status": "ok"} == client.get("/health").json()
        n = len(engines.calls)
        assert client.get("/version").json() == {"version": importlib.metadata.version("loragate")}  # its own
        assert len(engines.calls) == n


@pytest.mark.parametrize("argv, message", [
    (["serve", "--role", "router"], "role 'router' needs engines"),
    (["serve", "--role", "proxy"], "role must be one of all, engine, router"),
    (["serve", "--role", "router", "--engine-urls", "10.0.0.5:8000"], "is not a base URL"),
    (["serve", "--role", "router", "--engine-dns", "engines"], "expected 'name:port'"),
    (["serve", "--role", "router", "--engine-urls", "http://a:1", "--route-policy", "random"],
     "route_policy must be one of affinity, round_robin"),
])
def test_bad_router_flags_are_one_line_errors(argv, message, capsys):
    from loragate.gateway.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_router_flags_come_from_the_environment(monkeypatch):
    from loragate.gateway.cli import build_parser

    monkeypatch.setenv("LORAGATE_ROLE", "router")
    monkeypatch.setenv("LORAGATE_ENGINE_DNS", "loragate-engine:8000")
    monkeypatch.setenv("LORAGATE_MAX_ENGINE_LOAD", "5")
    args = build_parser().parse_args(["serve"])
    assert (args.role, args.engine_dns, args.max_engine_load, args.discovery_interval) == \
        ("router", "loragate-engine:8000", 5, 10.0)
