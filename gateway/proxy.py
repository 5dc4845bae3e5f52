"""Relaying one engine response to the client: headers, SSE streams, buffered bodies.

What the client sees when the engine fails part-way is explicit, never a silently short
answer: an SSE stream ends with an error event then `data: [DONE]` (the shape the engine's own
stream errors use, gateway/openai_api.py), a Responses stream with its `error` event; a
buffered body becomes a 502 in OpenAI's error shape; a raw relayed body (a file download) is
aborted so the client's HTTP library reports an incomplete message."""

from __future__ import annotations

import json
import logging

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .charges import CHARGE_HEADER, split_charge
from .errors import APIError

log = logging.getLogger("loragate.router")

REPLICA_HEADER = "x-loragate-replica"  # which engine answered: for clients, tests and debugging
# Hop-by-hop headers describe one connection, not the message (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "host"})
# The router's own server adds date and server; a charge report is for the router alone.
_SET_BY_SERVER = frozenset({"date", "server", CHARGE_HEADER})
# Failures that mean the engine is gone or unreachable: it is ejected at once.
ENGINE_GONE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


class UpstreamCut(Exception):
    """A relayed body broke after its status line went out: the response must be aborted."""


def request_headers(request: Request, *, drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The client's headers for the engine (Authorization included: engines authenticate)."""
    skip = _HOP_BY_HOP | drop
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in skip]
    if request.client is not None:
        prior = request.headers.get("x-forwarded-for")
        headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
        headers.append(("x-forwarded-for", f"{prior}, {request.client.host}" if prior else request.client.host))
    return headers


async def read_bounded_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused with a 413 past `limit` bytes (declared or sent)."""
    too_large = APIError(413, f"the request body exceeds {limit} bytes", param="body", code="too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def response_headers(upstream: httpx.Response, replica_url: str, *, keep_length: bool) -> list[tuple[bytes, bytes]]:
    skip = _HOP_BY_HOP | _SET_BY_SERVER if keep_length else _HOP_BY_HOP | _SET_BY_SERVER | {"content-length"}
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.multi_items()
           if k.lower() not in skip]
    out.append((REPLICA_HEADER.encode(), replica_url.encode("latin-1")))
    return out


def is_event_stream(upstream: httpx.Response) -> bool:
    return upstream.headers.get("content-type", "").startswith("text/event-stream")


class Lease:
    """One request's hold on an engine: its in-flight count and the open upstream response.
    `close` is idempotent and shielded, so a cancelled client still frees both."""

    def __init__(self, pool, replica):
        self.pool, self.replica = pool, replica
        self.upstream: httpx.Response | None = None
        self._is_closed = False
        pool.acquire(replica)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self.pool.release(self.replica)
        if self.upstream is not None:
            with anyio.CancelScope(shield=True):  # cancellation would leave the engine request running
                await self.upstream.aclose()


class LeasedStream(StreamingResponse):
    """A StreamingResponse that closes its lease however the response ends, including when
    the client left before the body iterator ever started (its `finally` would never run)."""

    def __init__(self, content, lease: Lease, status_code: int, raw_headers: list[tuple[bytes, bytes]]):
        super().__init__(content, status_code=status_code)
        self.raw_headers = raw_headers
        self.lease = lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.lease.close()


def _error_event(message: str, style: str, num_events: int) -> bytes:
    """The event a cut stream ends with: chat/completions' `data: {"error": ...}` (then
    [DONE]), a Responses stream's `error` event (numbered after the `num_events` sent), or a
    Messages stream's (Anthropic's shape)."""
    body = APIError(502, message, "server_error", code="engine_unavailable").body()
    if style == "chat":
        return f"data: {json.dumps(body)}\n\n".encode()
    event = {"type": "error", "sequence_number": num_events, "code": "engine_unavailable", "message": message,
             "param": None} if style == "responses" else {"type": "error", "error": {"type": "api_error",
                                                                                      "message": message}}
    return f"event: error\ndata: {json.dumps(event)}\n\n".encode()


# A stream is complete after `data: [DONE]` (chat, completions), one of the Responses API's
# final events, or the Messages API's message_stop (the first line of an event carrying
# `event: <type>`).
_FINAL_EVENTS = frozenset({b"data: [DONE]", b"event: response.completed", b"event: response.incomplete",
                           b"event: response.failed", b"event: message_stop", b"event: error"})


async def relay_events(lease: Lease, on_cut, on_charge=None):
    """Yield the engine's SSE events whole (never a partial event, so an error event appended
    after a cut stays parseable); if the stream stops before its final event, end it with an
    error event (and [DONE] where that ends a stream). `on_cut(reason, exc)` ejects the engine
    and counts the cut; `on_charge(tokens)` gets the engine's charge reports (gateway/charges.py),
    which are not relayed."""
    pending, is_done, num_events, style = b"", False, 0, None
    error: Exception | None = None
    try:
        async for chunk in lease.upstream.aiter_raw():
            pending += chunk
            *events, pending = pending.split(b"\n\n")  # loragate engines end every event with \n\n
            for event in events:
                tokens, event = split_charge(event)
                if tokens and on_charge is not None:
                    on_charge(tokens)
                first_line = event.strip().split(b"\n", 1)[0]
                is_done, num_events = first_line in _FINAL_EVENTS, num_events + 1
                if style is None and first_line:  # the first event tells which API's stream this is
                    style = "messages" if first_line.startswith(b"event: message_") else \
                        "responses" if first_line.startswith(b"event: ") else "chat"
                yield event + b"\n\n"
    except (*ENGINE_GONE, httpx.TimeoutException) as e:
        error = e
    finally:
        await lease.close()
    if not is_done:
        reason = f"{type(error).__name__}: {error}" if error else "the stream ended before its final event"
        on_cut(reason, error)
        yield _error_event(f"the engine serving this stream stopped mid-way ({reason}); the output above is "
                           "incomplete: retry the request", style or "chat", num_events)
        if style in (None, "chat"):
            yield b"data: [DONE]\n\n"


async def read_body(lease: Lease, on_cut) -> bytes:
    """The whole body; a cut becomes a 502 (its status line was not sent yet), a stall a 504."""
    try:
        return b"".join([chunk async for chunk in lease.upstream.aiter_raw()])
    except ENGINE_GONE as e:
        on_cut(f"{type(e).__name__}: {e}", e)
        raise APIError(502, f"the engine closed the connection mid-response ({type(e).__name__}); retry the request",
                       "server_error", code="engine_unavailable") from None
    except httpx.TimeoutException:
        raise APIError(504, "the engine stopped sending its response (engine_timeout); retry the request",
                       "server_error", code="engine_timeout") from None
    finally:
        await lease.close()


async def relay_raw(lease: Lease, on_cut):
    """The body as the engine sends it (Content-Length kept); a cut aborts the response."""
    try:
        async for chunk in lease.upstream.aiter_raw():
            yield chunk
    except (*ENGINE_GONE, httpx.TimeoutException) as e:
        on_cut(f"{type(e).__name__}: {e}", e)
        raise UpstreamCut(f"{lease.replica.url}: {type(e).__name__}: {e}") from None
    finally:
        await lease.close()


def buffered_response(body: bytes, upstream: httpx.Response, headers: list[tuple[bytes, bytes]]) -> Response:
    response = Response(body, status_code=upstream.status_code)  # sets Content-Length for this body
    response.raw_headers += headers
    return response


class EndCutResponses:
    """ASGI middleware: a relayed body that broke mid-way ends the connection without a
    traceback (the status line is out; the server closes the connection on the short body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except UpstreamCut as e:
            log.warning("relayed response aborted: engine %s", e)
