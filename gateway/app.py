"""The Starlette application: routes, error mapping, and model loading in the background so
/healthz answers at once and /readyz (and inference) say 503 until the model is ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import keys_file_watched
from .errors import APIError, error_response
from .models_api import get_model, list_models
from .openai_api import chat_completions, completions
from .request_ids import RequestIds, request_id
from .state import ServerState

log = logging.getLogger("loragate.gateway")


async def healthz(request: Request):
    """Liveness: 200 while the process serves, 503 once its engine stopped after an internal
    error, so an orchestrator restarts it (readiness alone would only take it out of rotation)."""
    engine = request.app.state.server.engine
    if engine is not None and engine.error is not None:
        return JSONResponse({"status": "engine_dead", "error": str(engine.error)}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request):
    state: ServerState = request.app.state.server
    engine = state.require_engine()
    # What the engine holds: routers in front of it (gateway/replicas.py) weigh it with their own counts.
    load = {"running": len(engine.engine.scheduler.running), "waiting": engine.num_waiting}
    return JSONResponse({"status": "ready", "model": state.model_name, "load": load})


async def metrics(request: Request):
    return Response(request.app.state.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _handle(request: Request, exc: Exception):
    response = error_response(exc, request.url.path)
    if response.status_code >= 500 and not isinstance(exc, APIError):
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id(request),
                  exc_info=exc)
    return response


def _handled_types() -> tuple[type[Exception], ...]:
    from loragate.adapters.errors import AdapterError, AdapterNotFound
    from loragate.engine.errors import InvalidRequestError

    from .uploads import UploadError

    # Registered one by one so Starlette answers them without treating them as crashes.
    return (APIError, HTTPException, InvalidRequestError, AdapterError, AdapterNotFound, UploadError, RecursionError,
            Exception)


def build_app(state: ServerState, load=None, tracing=None) -> Starlette:
    """`load()` (run in a thread at start-up) sets state.engine and state.registry; tests may
    instead fill the state and pass none. `tracing`: a tracing.Tracing, or None (no traces)."""
    from .adapters_api import routes as adapter_routes
    from .runtime_lora_api import routes as runtime_lora_routes
    from .embeddings_api import routes as embedding_routes
    from .scores_api import routes as score_routes
    from .sagemaker_api import routes as sagemaker_routes
    from .responses_api import response_store_service, routes as responses_routes
    from .messages_api import routes as messages_routes
    from .message_batches_api import routes as message_batch_routes
    from .tokenizer_api import routes as tokenizer_routes
    from .version_api import routes as version_routes
    from .batch_runner import batch_service
    from .batches_api import routes as batch_routes
    from .files_api import routes as file_routes

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = None
        if load is not None:
            def run():
                try:
                    load(state)
                except Exception as e:  # noqa: BLE001 - surfaced through /readyz
                    log.exception("model loading failed")
                    state.load_error = str(e)
            thread = threading.Thread(target=run, name="loragate-load", daemon=True)
            thread.start()
        # The batch runner waits for the engine itself, and stops before it.
        async with batch_service(app, state), response_store_service(app, state), keys_file_watched(state.keys):
            yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown)
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)

    routes = [
        Route("/healthz", healthz),
        Route("/health", healthz),  # vLLM's name for it, for probes written against vLLM
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *version_routes,
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),  # a shared adapter's id has a '/'
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *adapter_routes,
        *runtime_lora_routes,
        *embedding_routes,
        *score_routes,
        *sagemaker_routes(readyz),
        *responses_routes,
        *messages_routes,
        *message_batch_routes,
        *tokenizer_routes,
        *file_routes,
        *batch_routes,
    ]
    from .metrics import Metrics, RequestCounter

    state.metrics = Metrics(state)
    middleware = [Middleware(RequestIds), Middleware(RequestCounter, metrics=state.metrics)]
    if tracing is not None:
        middleware.append(Middleware(tracing.middleware))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={t: _handle for t in _handled_types()},
                    middleware=middleware)
    app.state.server = state
    return app
