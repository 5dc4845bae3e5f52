"""GET /version: the server's version, as vLLM answers it (dashboards and clients read it to
tell servers apart); open like /health, on engines and the router alike."""

from __future__ import annotations

import importlib.metadata

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": importlib.metadata.version("loragate")})


routes = [Route("/version", version)]
