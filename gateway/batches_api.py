"""OpenAI's Batch API: POST /v1/batches, GET /v1/batches (`limit`, `after`),
GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. The work itself is gateway/batch_runner.py.

Tenant-scoped like files: another tenant's batch answers 404. A batch runs as the tenant that
owns its input file, so an admin starting one for a tenant's file runs it with that tenant's
adapters."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .batch_input import ENDPOINTS
from .batch_store import TIMESTAMPS, BatchConflict
from .errors import APIError, not_found
from .files_api import batch_store, list_body, owned_file, page_params, tenant_scope, unknown_cursor, visible
from .openai_api import json_body, principal_of

COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def batch_json(record, counts: dict) -> dict:
    errors = {"object": "list", "data": record.errors} if record.errors else None
    return {"id": record.id, "object": "batch", "endpoint": record.endpoint, "errors": errors,
            "input_file_id": record.input_file_id, "completion_window": record.completion_window,
            "status": record.status, "output_file_id": record.output_file_id, "error_file_id": record.error_file_id,
            "created_at": record.created_at, "expires_at": record.expires_at,
            **{name: getattr(record, name) for name in TIMESTAMPS},
            "request_counts": counts, "metadata": record.metadata}


async def _batch_response(store, record) -> JSONResponse:
    counts = await asyncio.to_thread(store.request_counts, record.id)
    return JSONResponse(batch_json(record, counts))


def _metadata(value) -> dict | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS
            or not all(isinstance(k, str) and len(k) <= MAX_METADATA_KEY_CHARS for k in value)
            or not all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE_CHARS for v in value.values())):
        raise APIError(400, f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string pairs (keys up to "
                            f"{MAX_METADATA_KEY_CHARS} characters, values up to {MAX_METADATA_VALUE_CHARS})",
                       param="metadata")
    return value


def notify_runner(request: Request) -> None:
    runner = getattr(request.app.state, "batch_runner", None)
    if runner is not None:
        runner.notify()


async def owned_batch(request: Request, store, principal):
    batch_id = request.path_params["batch_id"]
    record = visible(request, principal, await asyncio.to_thread(store.get_batch, batch_id))
    if record is None:
        raise not_found(f"batch {batch_id!r} does not exist", param="batch_id", code="batch_not_found")
    return record


async def create_batch(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise APIError(400, "'input_file_id' is required: the id of a file uploaded with purpose \"batch\"",
                       param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise APIError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    window = body.get("completion_window")
    if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
        raise APIError(400, f"'completion_window' must be one of {', '.join(COMPLETION_WINDOWS)}, got {window!r}",
                       param="completion_window")
    metadata = _metadata(body.get("metadata"))
    input_file = await owned_file(request, store, principal, input_file_id, param="input_file_id")
    if input_file.purpose != "batch":
        raise APIError(400, f"file {input_file_id!r} has purpose {input_file.purpose!r}; a batch's input file must "
                            "be uploaded with purpose \"batch\"", param="input_file_id")
    record = await asyncio.to_thread(store.create_batch, input_file.tenant, endpoint, input_file_id, window,
                                     COMPLETION_WINDOWS[window], metadata)
    notify_runner(request)
    return await _batch_response(store, record)


async def get_batch(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    return await _batch_response(store, await owned_batch(request, store, principal))


async def list_batches(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    limit, after = page_params(request, 20, 100)
    if after is not None and visible(request, principal, await asyncio.to_thread(store.get_batch, after)) is None:
        raise unknown_cursor(after)
    records, has_more = await asyncio.to_thread(store.list_batches, tenant_scope(request, principal), limit, after)
    items = [batch_json(r, await asyncio.to_thread(store.request_counts, r.id)) for r in records]
    return JSONResponse(list_body(items, has_more))


async def cancel_batch(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    record = await owned_batch(request, store, principal)
    try:
        record = await asyncio.to_thread(store.request_cancel, record.id)
    except BatchConflict as e:
        raise APIError(409, f"batch {record.id!r} is {e} and can no longer be cancelled", param="batch_id",
                       code="batch_not_cancellable") from None
    notify_runner(request)
    return await _batch_response(store, record)


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
