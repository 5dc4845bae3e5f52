"""X-Request-Id: every response carries one, the caller's own where it sent a usable one (1 to
128 visible ASCII characters), else a new one. The id is also put on the request, so a router
passes it on to the engine it picks: one id names the request in the router's and the
engine's error logs, traces and audit lines."""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")


class RequestIds:
    """ASGI middleware; install it outermost, so everything inside sees the id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = [v for k, v in scope["headers"] if k == HEADER]
        request_id = given[0] if len(given) == 1 and _USABLE.fullmatch(given[0]) else uuid.uuid4().hex.encode()
        if given != [request_id]:
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != HEADER] + [(HEADER, request_id)]

        async def send_with_id(message):
            if message["type"] == "http.response.start":  # one, ours (a router relays the engine's)
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER] \
                    + [(HEADER, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request) -> str | None:
    return request.headers.get("x-request-id")
