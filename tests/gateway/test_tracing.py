"""OpenTelemetry traces of inference requests (gateway/tracing.py): one span per request
with the usage the response reports, the caller's traceparent as its parent, the router's
span as the engine's parent, and spans exported to a collector over OTLP/HTTP and OTLP/gRPC."""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from loragate.engine.errors import ModelConfigError
from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import RunningServer, drop_a_stream

pytest.importorskip("opentelemetry.sdk", reason="OpenTelemetry is not installed (pip install -e '.[dev]')")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from loragate.gateway.tracing import Tracing  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def finished_spans(tracing: Tracing, exporter: InMemorySpanExporter) -> list:
    tracing.provider.force_flush()
    spans = list(exporter.get_finished_spans())
    exporter.clear()
    return spans


@pytest.fixture
def traced(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    exporter = InMemorySpanExporter()
    tracing = Tracing(None, "loragate-engine", exporter=exporter)
    s = RunningServer(tiny_llama, None, tracing=tracing)
    yield s, tracing, exporter
    s.stop()


def test_a_span_per_request_carries_its_usage_and_the_callers_trace(traced):
    s, tracing, exporter = traced
    headers = {**s.headers(), "traceparent": TRACEPARENT}
    body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 7, "ignore_eos": True, "n": 2, "temperature": 0.5}
    answered = httpx.post(s.url + "/v1/completions", json=body, headers=headers, timeout=60)
    answer = answered.json()
    httpx.get(s.url + "/v1/models", headers=headers)  # not an inference request: no span
    [span] = finished_spans(tracing, exporter)
    a = span.attributes
    assert span.name == "llm_request" and span.kind.name == "SERVER"
    assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == PARENT_ID
    assert (a["gen_ai.usage.prompt_tokens"], a["gen_ai.usage.completion_tokens"]) == (
        answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (a["gen_ai.usage.prompt_tokens"], 14)
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.request.n"] == 2 and a["gen_ai.request.max_tokens"] == 7
    assert a["gen_ai.request.temperature"] == 0.5 and a["loragate.tenant"] == "tenant-a"
    assert a["loragate.adapter"] == "base" and a["http.response.status_code"] == 200
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length", "length")
    assert 0 < a["gen_ai.latency.time_to_first_token"] < a["gen_ai.latency.e2e"]
    assert 0 <= a["gen_ai.latency.time_in_queue"] < a["gen_ai.latency.e2e"]
    assert span.status.status_code.name == "UNSET"
    assert span.resource.attributes["service.name"] == "loragate-engine"
    assert tuple(a["http.request.header.x-request-id"]) == (answered.headers["x-request-id"],)
    message = httpx.post(s.url + "/v1/messages", headers={"x-api-key": "key-a"}, timeout=60, json={
        "model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "t5"}]}).json()  # Anthropic's API
    [span] = finished_spans(tracing, exporter)
    assert span.attributes["http.route"] == "/v1/messages" and span.attributes["loragate.tenant"] == "tenant-a"
    assert (span.attributes["gen_ai.usage.prompt_tokens"], span.attributes["gen_ai.usage.completion_tokens"]) == (
        message["usage"]["input_tokens"], message["usage"]["output_tokens"])


def test_streams_embeddings_reranks_refusals_and_dropped_streams_are_traced_too(traced):
    s, tracing, exporter = traced
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "t5"}], "max_tokens": 5, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text = httpx.post(s.url + "/v1/chat/completions", json=chat, headers=s.headers(), timeout=60).text
    assert '"completion_tokens": 5' in text
    embedded = httpx.post(s.url + "/v1/embeddings", json={"model": "tiny", "input": "t5 t6"}, headers=s.headers())
    reranked = httpx.post(s.url + "/rerank", json={"model": "tiny", "query": "t5", "documents": ["t6", "t7"]},
                          headers=s.headers())
    bad = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "t5", "temperature": 9},
                     headers=s.headers())
    assert bad.status_code == 400
    drop_a_stream(s)
    spans = []
    for _ in range(100):  # the dropped stream's span ends once the server notices
        spans += finished_spans(tracing, exporter)
        if len(spans) == 5:
            break
        time.sleep(0.05)
    streamed, embedding, rerank, refused, dropped = sorted(spans, key=lambda sp: sp.start_time)
    assert streamed.attributes["gen_ai.usage.completion_tokens"] == 5
    assert embedding.attributes["gen_ai.usage.prompt_tokens"] == embedded.json()["usage"]["prompt_tokens"]
    assert "gen_ai.usage.completion_tokens" not in embedding.attributes  # it generates nothing
    assert rerank.attributes["http.route"] == "/rerank"
    assert rerank.attributes["gen_ai.usage.prompt_tokens"] == reranked.json()["usage"]["total_tokens"]
    assert refused.attributes["http.response.status_code"] == 400 and refused.status.status_code.name == "UNSET"
    assert 1 <= dropped.attributes["gen_ai.usage.completion_tokens"] < 1000
    assert "gen_ai.response.finish_reasons" not in dropped.attributes  # it never finished


def test_the_routers_span_is_the_engines_parent(traced):
    s, engine_tracing, engine_spans = traced
    router_spans = InMemorySpanExporter()
    router_tracing = Tracing(None, "loragate-router", exporter=router_spans)
    settings = GatewaySettings(role="router", engine_urls=s.url, health_interval=60.0)
    with TestClient(build_router_app(settings, tracing=router_tracing)) as router:
        r = router.post("/v1/completions", json={"model": "tiny", "prompt": "t5", "max_tokens": 3},
                        headers={**s.headers(), "traceparent": TRACEPARENT})
        assert r.status_code == 200
    [route] = finished_spans(router_tracing, router_spans)
    [served] = finished_spans(engine_tracing, engine_spans)
    assert route.name == "router_request" and route.resource.attributes["service.name"] == "loragate-router"
    assert format(route.parent.span_id, "016x") == PARENT_ID
    assert served.context.trace_id == route.context.trace_id and served.parent.span_id == route.context.span_id
    assert route.attributes["loragate.engine"] == s.url and route.attributes["loragate.retries"] == 0


def one_exported_span(request) -> None:
    """`request` (an ExportTraceServiceRequest) holds the engine's one span of a 2-token completion."""
    [resource_spans] = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    [span] = [sp for scope in resource_spans.scope_spans for sp in scope.spans]
    assert service == "loragate-engine" and span.name == "llm_request"
    usage = {a.key: a.value.int_value for a in span.attributes if a.key.startswith("gen_ai.usage.")}
    assert usage["gen_ai.usage.completion_tokens"] == 2 and usage["gen_ai.usage.prompt_tokens"] >= 1


def complete_once(tiny_llama, endpoint: str) -> None:
    """A traced server sends one completion, then stops, and so exports what is pending."""
    s = RunningServer(tiny_llama, None, tracing=Tracing(endpoint, "loragate-engine"))
    try:
        assert httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "t5", "max_tokens": 2},
                          headers=s.headers()).status_code == 200
    finally:
        s.stop()


@pytest.mark.parametrize("path", ["/v1/traces", ""])  # without a path: the collector's traces path
def test_spans_reach_an_otlp_http_collector(tiny_llama, tmp_path, monkeypatch, path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.headers["Content-Type"],
                             self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    try:
        complete_once(tiny_llama, f"http://127.0.0.1:{collector.server_address[1]}{path}")
    finally:
        collector.shutdown()
    assert [(path, kind) for path, kind, _ in received] == [("/v1/traces", "application/x-protobuf")]
    one_exported_span(ExportTraceServiceRequest.FromString(received[0][2]))


@pytest.mark.parametrize("scheme, protocol", [("grpc", None), ("http", "grpc")])
def test_spans_reach_an_otlp_grpc_collector(tiny_llama, tmp_path, monkeypatch, scheme, protocol):
    """vLLM's two ways of naming a gRPC collector: a grpc:// URL, or any URL and
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc; both in the clear, as a collector in a cluster is."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="pip install -e '.[dev]'")
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    if protocol:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
    try:
        complete_once(tiny_llama, f"{scheme}://127.0.0.1:{port}")
    finally:
        collector.stop(grace=None)
    [request] = received
    one_exported_span(request)


@pytest.mark.parametrize("endpoint, protocol, error", [
    ("http://collector:4318/v1/traces", "http/json", "'http/json' is not supported"),
    ("grpc://collector:4317", "http/protobuf", "is a gRPC URL but the protocol is http/protobuf"),
])
def test_a_protocol_the_exporter_cannot_speak_is_refused_at_start(monkeypatch, endpoint, protocol, error):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
    with pytest.raises(ModelConfigError, match=error):
        Tracing(endpoint, "loragate-engine")


@pytest.mark.parametrize("endpoint", ["collector:4317", "ftp://collector/v1/traces", "grpc://collector:4317/v1/traces"])
def test_a_url_that_names_no_otlp_collector_is_refused(endpoint):
    with pytest.raises(ModelConfigError, match="otlp_traces_endpoint must be an OTLP collector's URL"):
        GatewaySettings(otlp_traces_endpoint=endpoint)
