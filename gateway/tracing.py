"""OpenTelemetry traces of inference requests (`--otlp-traces-endpoint`, as vLLM's flag).

Each inference HTTP request (completions, chat, responses, embeddings) is one SERVER span,
`llm_request` on engines and `router_request` on routers, exported over OTLP (HTTP or gRPC,
span_exporter) in batches off the request path. A W3C `traceparent` header from the client makes it a child of the
caller's span, and the router sends its own span's context on to the engine, so a trace shows
client, router and engine as one tree. Attributes follow the GenAI semantic conventions as
vLLM sets them (`gen_ai.request.*`, `gen_ai.usage.*`, `gen_ai.latency.*`) plus `loragate.*`
(tenant, adapter, engine chosen, retries); never prompt or output text.

Without an endpoint nothing here runs: no middleware, and handlers see no RequestTrace.
The SDK's own variables apply (OTEL_EXPORTER_OTLP_TRACES_HEADERS for an auth header,
OTEL_TRACES_SAMPLER for sampling, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES).
"""

from __future__ import annotations

import contextvars
import os
import time
import urllib.parse

from loragate.engine.errors import ModelConfigError

PROTOCOLS = ("grpc", "http/protobuf")  # the Python SDK has no http/json exporter
# The routes that run the model (and that a router routes by adapter affinity)
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                             "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank", "/invocations",
                             "/v1/messages"})
_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("loragate_request_trace", default=None)


def current() -> RequestTrace | None:
    """The trace of the request being handled; None when tracing is off."""
    return _current.get()


class RequestTrace:
    """One request's span and what it adds up to: handlers report, the middleware writes the
    totals when the response ends (a stream the client dropped included)."""

    def __init__(self, span):
        self.span = span
        self.start = time.monotonic()
        self.completion_tokens = 0
        self.first_token: float | None = None  # seconds after start
        self.queue: float | None = None  # the longest wait for the batch among the request's choices
        self.finish_reasons: list[str] = []

    def set(self, **attributes) -> None:
        self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def started(self, model: str, served_model: str, tenant: str, adapter: str, prompt_tokens: int,
                **request) -> None:
        """What the request asked for (`request`: gen_ai.request.* such as n, max_tokens)."""
        self.set(**{"gen_ai.request.model": model, "gen_ai.response.model": served_model, "loragate.tenant": tenant,
                    "loragate.adapter": adapter, "gen_ai.usage.prompt_tokens": prompt_tokens,
                    **{f"gen_ai.request.{k}": v for k, v in request.items()}})

    def output(self, tokens: int) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic() - self.start
        self.completion_tokens += tokens

    def finished(self, reason: str, queue_seconds: float) -> None:
        self.finish_reasons.append(reason)
        self.queue = max(self.queue or 0.0, queue_seconds)

    def close(self, status: int | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.set(**{"http.response.status_code": status, "gen_ai.latency.e2e": time.monotonic() - self.start,
                    "gen_ai.latency.time_to_first_token": self.first_token,
                    "gen_ai.latency.time_in_queue": self.queue})
        if self.first_token is not None:
            self.set(**{"gen_ai.usage.completion_tokens": self.completion_tokens})
        if self.finish_reasons:
            self.set(**{"gen_ai.response.finish_reasons": self.finish_reasons})
        if status is None or status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}" if status else "no response"))
        self.span.end()


class Tracing:
    """The tracer of one server (engine or router) and its exporter."""

    def __init__(self, endpoint: str | None, service: str, exporter=None):
        """endpoint: an OTLP collector's URL (see span_exporter); `exporter` instead: any
        SpanExporter (tests)."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ModelConfigError("otlp_traces_endpoint needs OpenTelemetry: pip install 'loragate[tracing]'") \
                from None
        if exporter is None:
            exporter = span_exporter(endpoint)
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("loragate")
        self.span_name = "router_request" if service.endswith("router") else "llm_request"

    def middleware(self, app):
        return _TracingMiddleware(app, self)

    def shutdown(self) -> None:
        """Export what is pending, then stop."""
        self.provider.shutdown()


class _TracingMiddleware:
    """ASGI: a span around each inference request, from its first byte to its response's last."""

    def __init__(self, app, tracing: Tracing):
        self.app, self.tracing = app, tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in INFERENCE_PATHS:
            return await self.app(scope, receive, send)
        from opentelemetry import context, propagate
        from opentelemetry.trace import SpanKind, set_span_in_context

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        span = self.tracing.tracer.start_span(self.tracing.span_name, context=propagate.extract(headers),
                                              kind=SpanKind.SERVER,
                                              attributes={"http.request.method": "POST", "http.route": scope["path"],
                                                          # gateway/request_ids.py has put one on every request
                                                          "http.request.header.x-request-id":
                                                              [headers.get("x-request-id", "")]})
        trace = RequestTrace(span)
        status = {"code": None}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        token, ctx_token = _current.set(trace), context.attach(set_span_in_context(span))
        try:
            await self.app(scope, receive, send_status)
        finally:
            context.detach(ctx_token)
            _current.reset(token)
            trace.close(status["code"])


def otlp_protocol(endpoint: str) -> str:
    """The OTLP transport for `endpoint`: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or
    OTEL_EXPORTER_OTLP_PROTOCOL) where set, as vLLM reads it; else gRPC for a grpc:// URL and
    HTTP for an http(s):// one. vLLM's default is gRPC whatever the scheme, OpenTelemetry's is
    HTTP: the scheme settles it for both kinds of user without a variable."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol is None:
        return "grpc" if endpoint.startswith("grpc://") else "http/protobuf"
    if protocol not in PROTOCOLS:
        raise ModelConfigError(f"OTLP protocol {protocol!r} is not supported for traces: use one of "
                               f"{', '.join(PROTOCOLS)} (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)")
    if protocol == "http/protobuf" and endpoint.startswith("grpc://"):
        raise ModelConfigError(f"otlp_traces_endpoint {endpoint} is a gRPC URL but the protocol is "
                               "http/protobuf: give an http(s):// URL or unset OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
    return protocol


def span_exporter(endpoint: str):
    """An OTLP exporter for `endpoint`. Over HTTP a URL without a path gets the collector's
    traces path, /v1/traces, which is the only one a collector answers on. Over gRPC the
    exporter dials host:port with TLS for https:// and in the clear otherwise, unless
    OTEL_EXPORTER_OTLP_TRACES_INSECURE says which (the SDK alone would use TLS for grpc://, so
    a vLLM user's grpc://collector:4317 would fail its handshake against a plain collector)."""
    try:
        if otlp_protocol(endpoint) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            insecure = None if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or \
                os.environ.get("OTEL_EXPORTER_OTLP_INSECURE") else not endpoint.startswith("https://")
            return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ModelConfigError(f"otlp_traces_endpoint needs {e.name}: pip install 'loragate[tracing]'") from None
    if urllib.parse.urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def inject_context(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` for an upstream request, carrying the current span's context (traceparent)
    in place of the client's where a request is traced."""
    if current() is None:
        return headers
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    names = {k.lower() for k in carrier}
    return [(k, v) for k, v in headers if k.lower() not in names] + list(carrier.items())


def tracing_of(settings, service: str) -> Tracing | None:
    """The server's Tracing where settings.otlp_traces_endpoint is set."""
    return Tracing(settings.otlp_traces_endpoint, service) if settings.otlp_traces_endpoint else None
