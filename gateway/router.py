"""`loragate serve --role router`: no model; spreads the OpenAI API over engine replicas.

Inference (/v1/chat/completions, /v1/completions, /v1/responses, streamed or not,
/v1/embeddings, score, rerank and SageMaker's /invocations) goes by adapter affinity: the key
is the request's `model` plus a hash of the caller's Authorization header (two tenants'
same-named adapters are different adapters), ranked over the healthy engines by rendezvous
hashing (gateway/rendezvous.py), so one adapter's weights stay hot in the slots of one engine
instead of being loaded everywhere. A hot adapter (the base model, say) gets several
engines; among them a request goes where the start of its prompt last ran, so a
conversation's turns find their history in one engine's prefix cache (gateway/prefix_index.py;
`--prefix-routing`). An engine with `max_engine_load` requests open spills its adapters' new
requests to their next engine (spills are counted).

Everything else under /v1 (/v1/models, /v1/adapters*, /v1/files*, /v1/batches*) goes to the
first healthy engine in URL order. Not hashed: every router of a fleet picks the same engine,
so adapter writes have one writer (the shared store sees no concurrent puts of one name) and
a batch or file is read back from the engine that created it; if that engine fails the next
one takes over, reading the same shared store. Request bodies are streamed (uploads can be
large) with their Content-Length. The router passes Authorization through and engines answer
401 themselves. Given tenants' rate limits (and their keys), the router keeps those for the
whole fleet, with the tokens each engine reports (gateway/router_limits.py).

Failures: a request that fails before any byte reached the client (connection error, or a
429/5xx answer) is retried once on another engine; a connection error ejects its engine at
once, and health checks (GET /readyz every `health_interval`) eject and re-admit engines.
A stream cut mid-way ends with an error event (gateway/proxy.py); no engine -> 503 with
Retry-After. The router's own /readyz is 200 while at least one engine is in rotation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import authorization_of, watch_keys_file
from .charges import CHARGE_HEADER
from .discovery import EngineDiscovery, resolve_addresses
from .errors import APIError, error_response
from .openai_api import until_disconnect
from .request_ids import RequestIds, request_id
from .proxy import (ENGINE_GONE, EndCutResponses, Lease, LeasedStream, buffered_response, is_event_stream,
                    read_body, read_bounded_body, relay_events, relay_raw, request_headers, response_headers)
from .prefix_index import response_hashes, response_id_of
from .replicas import ReplicaPool
from .router_limits import FleetRateLimits
from .router_metrics import RouterMetrics
from .routing_inputs import routing_inputs
from .tracing import INFERENCE_PATHS, Tracing, inject_context, tracing_of
from .tracing import current as current_trace
from .version_api import routes as version_routes

log = logging.getLogger("loragate.router")

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # another engine may well answer these
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Far above any prompt the engines accept (a context of 128k tokens is well under 1 MiB of JSON).
MAX_INFERENCE_BODY = 32 << 20


class Router:
    def __init__(self, settings, discovery: EngineDiscovery, client: httpx.AsyncClient | None = None):
        self.settings, self.discovery = settings, discovery
        self.pool = ReplicaPool(RouterMetrics, policy=settings.route_policy, max_load=settings.max_engine_load,
                                prefix_routing=settings.prefix_routing)
        self.metrics: RouterMetrics = self.pool.metrics
        self.limits = FleetRateLimits.from_settings(settings)  # None: no rate limits here
        self.metrics.watch_rate_limits(self.limits)
        self._own_client = client is None
        self.client = client
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.client is None:
            s = self.settings
            # No connection cap: the engines' own queues are the back-pressure (429), not a pool.
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=s.engine_timeout, write=60.0,
                                                                  pool=None),
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await self.refresh_members()
        self._tasks.append(asyncio.create_task(self._every(self.settings.health_interval, self.check_health)))
        if self.limits is not None and self.limits.keys.keys_file is not None:  # tenants added or revoked
            self._tasks.append(asyncio.create_task(watch_keys_file(self.limits.keys)))
        if self.discovery.dns_target is not None:
            self._tasks.append(asyncio.create_task(self._every(self.settings.discovery_interval,
                                                               self.refresh_members)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_client and self.client is not None:
            await self.client.aclose()
        if self.limits is not None:
            await self.limits.close()

    async def refresh_members(self) -> None:
        urls = await asyncio.to_thread(self.discovery.discover)  # DNS lookups block
        added = self.pool.update(urls)
        await asyncio.gather(*(self.pool.check(self.client, r) for r in added))

    async def check_health(self) -> None:
        await self.pool.check_all(self.client)

    @staticmethod
    async def _every(interval: float, job) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:  # noqa: BLE001 - a failed round must not end the loop
                log.exception("router background job %s failed", getattr(job, "__name__", job))

    # -- relaying --------------------------------------------------------------------------

    def _on_cut(self, replica):
        def on_cut(reason: str, exc: Exception | None) -> None:
            self.metrics.stream_cuts.labels(replica.url).inc()
            if isinstance(exc, ENGINE_GONE):
                self.pool.eject(replica, f"connection lost mid-response: {reason}")
        return on_cut

    def no_engine(self, *, count: bool = True) -> APIError:
        if count:
            self.metrics.unavailable.inc()
        retry_after = str(max(1, math.ceil(self.settings.health_interval)))
        return APIError(503, "no engine replica is available right now; retry shortly", "server_error",
                        code="no_replica", headers={"Retry-After": retry_after})

    async def _send(self, lease: Lease, method: str, path: str, headers, content) -> httpx.Response | None:
        """The engine's response (status line and headers read), or None when it is unreachable
        (then ejected). A stall before the status line is a 504, not retried: the engine may be
        working on it, and a second engine would only double the load."""
        replica = lease.replica
        request = self.client.build_request(method, replica.url + path, headers=headers, content=content)
        try:
            lease.upstream = await self.client.send(request, stream=True)
        except ENGINE_GONE as e:
            self.metrics.requests.labels(replica.url, "error").inc()
            self.pool.eject(replica, f"connection error: {type(e).__name__}: {e}")
            return None
        except httpx.TimeoutException:
            self.metrics.requests.labels(replica.url, "error").inc()
            raise APIError(504, f"the engine did not answer within {self.settings.engine_timeout:g} s",
                           "server_error", code="engine_timeout") from None
        self.metrics.requests.labels(replica.url, str(lease.upstream.status_code)).inc()
        return lease.upstream

    async def relay_inference(self, path: str, headers, body: bytes, key: str, prefix: list[bytes] = (),
                              tenant: str | None = None) -> Response:
        """`tenant`: whose rate limits (router_limits.py) the engine's charge reports go to."""
        if tenant is not None:
            headers = [*headers, (CHARGE_HEADER, "1")]
        headers = inject_context(headers)  # the engine's span is a child of this one
        trace = current_trace()
        tried: set[str] = set()
        retry_reason = None
        for _attempt in range(2):
            choice = self.pool.choose(key, tried, prefix)
            if choice is None:
                break
            if choice.for_prefix:
                self.metrics.prefix_routed.inc()
            if retry_reason is not None:
                self.metrics.retries.labels(retry_reason).inc()
            if choice.is_spill:
                self.metrics.spills.inc()
            lease = Lease(self.pool, choice.replica)
            tried.add(choice.replica.url)
            if trace is not None:
                trace.set(**{"loragate.engine": choice.replica.url, "loragate.retries": len(tried) - 1,
                             "loragate.spill": choice.is_spill, "loragate.prefix_routed": choice.for_prefix,
                             "loragate.tenant": tenant})
            handed_over = False  # to the streaming response, which closes the lease when done
            try:
                upstream = await self._send(lease, "POST", path, headers, body)
                if upstream is None:
                    retry_reason = "connection_error"
                    continue
                if (upstream.status_code in _RETRY_STATUSES and retry_reason is None
                        and any(r.url not in tried for r in self.pool.healthy())):
                    if upstream.status_code == 503:  # not ready or dead: out until /readyz passes
                        self.pool.eject(choice.replica, "answered 503")
                    retry_reason = str(upstream.status_code)
                    continue
                remember = path == "/v1/responses" and upstream.status_code == 200 and self.pool.prefixes is not None
                raw_headers = response_headers(upstream, choice.replica.url, keep_length=False)
                if tenant is not None:
                    raw_headers = await self.limits.response_headers(tenant, upstream, raw_headers)
                if upstream.status_code == 200 and is_event_stream(upstream):
                    handed_over = True
                    on_charge = functools.partial(self.limits.charge, tenant) if tenant is not None else None
                    events = relay_events(lease, self._on_cut(choice.replica), on_charge)
                    if remember:
                        events = self._remember_response(events, key, choice.replica.url)
                    return LeasedStream(events, lease, 200, raw_headers)
                answer = await read_body(lease, self._on_cut(choice.replica))
                if remember:
                    self._note_response(response_id_of(answer), key, choice.replica.url)
                return buffered_response(answer, upstream, raw_headers)
            finally:
                if not handed_over:
                    await lease.close()
        raise self.no_engine()

    def _note_response(self, response_id: str | None, key: str, url: str) -> None:
        """A response's engine holds its conversation: a request going on from it goes there."""
        if response_id:
            self.pool.prefixes.record(response_hashes(key, response_id), url)

    async def _remember_response(self, events, key: str, url: str):
        """Relay a Responses stream, noting its id from its first event (response.created)."""
        first = True
        async for event in events:
            if first:
                self._note_response(response_id_of(event.strip()), key, url)
                first = False
            yield event

    async def forward_one(self, request: Request) -> Response:
        has_body = int(request.headers.get("content-length") or 0) > 0 or "transfer-encoding" in request.headers
        body_started = False

        async def body():
            nonlocal body_started
            async for chunk in request.stream():
                body_started = True
                yield chunk

        raw_path = request.scope.get("raw_path") or request.url.path.encode()  # as sent: %-escapes kept
        path = raw_path.decode("latin-1") + (f"?{request.url.query}" if request.url.query else "")
        headers = request_headers(request)  # Content-Length kept: the engine checks it before reading
        tried: set[str] = set()
        while not body_started:  # an unreachable engine never saw the body: another one may take it
            replica = self.pool.first_healthy(tried)
            if replica is None:
                break
            if tried:
                self.metrics.retries.labels("connection_error").inc()
            tried.add(replica.url)
            lease = Lease(self.pool, replica)
            handed_over = False
            try:
                upstream = await self._send(lease, request.method, path, headers, body() if has_body else None)
                if upstream is None:
                    continue
                handed_over = True
                return LeasedStream(relay_raw(lease, self._on_cut(replica)), lease, upstream.status_code,
                                    response_headers(upstream, replica.url, keep_length=True))
            finally:
                if not handed_over:
                    await lease.close()
        if body_started:
            raise APIError(502, "the engine went away while receiving the request body; retry the request",
                           "server_error", code="engine_unavailable")
        raise self.no_engine()


# -- HTTP handlers -------------------------------------------------------------------------

async def inference(request: Request) -> Response:
    router: Router = request.app.state.router
    body = await read_bounded_body(request, MAX_INFERENCE_BODY)  # held in memory to be re-sent on a retry
    authorization = authorization_of(request.headers)
    tenant = await router.limits.admit(authorization) if router.limits is not None else None
    key, prefix = routing_inputs(body, authorization, router.pool.prefixes is not None)
    # identity: SSE events are split on their text; Content-Length: httpx sets it for the bytes.
    # A charge report is the router's to ask for (relay_inference), not the client's.
    headers = request_headers(request, drop=frozenset({"content-length", "accept-encoding", CHARGE_HEADER}))
    headers.append(("accept-encoding", "identity"))
    # A client that leaves while a non-streamed answer is computed closes the engine request too.
    return await until_disconnect(request, router.relay_inference(request.url.path, headers, body, key, prefix,
                                                                  tenant))


async def forward(request: Request) -> Response:
    return await request.app.state.router.forward_one(request)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    router: Router = request.app.state.router
    healthy = [r.url for r in router.pool.healthy()]
    if not healthy:
        raise router.no_engine(count=False)
    return JSONResponse({"status": "ready", "engines": healthy})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _handle(request: Request, exc: Exception) -> Response:
    response = error_response(exc, request.url.path)
    if response.status_code >= 500 and not isinstance(exc, APIError):
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id(request),
                  exc_info=exc)
    return response


def build_router_app(settings, *, client: httpx.AsyncClient | None = None,
                     resolver=resolve_addresses, tracing: Tracing | None = None) -> Starlette:
    """The router app; `client` (e.g. over httpx.MockTransport), `resolver` and `tracing` (an
    exporter of its own) are for tests."""
    router = Router(settings, EngineDiscovery.from_settings(settings, resolver), client)
    tracing = tracing or tracing_of(settings, "loragate-router")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await router.start()
        try:
            yield
        finally:
            await router.stop()
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)

    routes = [
        Route("/healthz", healthz),
        Route("/health", healthz),  # vLLM's name for it
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *version_routes,
        *(Route(path, inference, methods=["POST"]) for path in sorted(INFERENCE_PATHS)),
        Route("/ping", readyz, methods=["GET", "POST"]),  # SageMaker's health check (gateway/sagemaker_api.py)
        Route("/v1/{path:path}", forward, methods=_ALL_METHODS),
        *(Route(path, forward, methods=_ALL_METHODS) for path in ("/tokenize", "/detokenize", "/tokenizer_info")),
    ]
    middleware = [Middleware(tracing.middleware)] if tracing is not None else []  # the span covers all
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(RequestIds), *middleware, Middleware(EndCutResponses)],
                    exception_handlers={APIError: _handle, HTTPException: _handle, Exception: _handle})
    app.state.router = router
    return app
