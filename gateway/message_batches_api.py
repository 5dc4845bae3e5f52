"""Anthropic's Message Batches API: POST /v1/messages/batches, GET /v1/messages/batches
(`limit`, `after_id`), GET /v1/messages/batches/{id}, POST .../{id}/cancel, GET .../{id}/results
(JSONL) and DELETE .../{id}, for clients written against Anthropic's SDK. Lists are newest
first; `after_id` pages to older batches, `before_id` to newer ones.

A message batch is a batch of the batch API (gateway/batch_runner.py) on the endpoint
/v1/messages: its requests are stored as that batch's input file, so it is durable in the same
SQLite store, survives restarts without losing or repeating a request, runs behind interactive
traffic, and is its tenant's alone. Each request runs as POST /v1/messages would answer it; a
result is `succeeded` with the message, `errored` with the error in Anthropic's shape (bad
params are found when the request runs, as Anthropic does), `canceled` or `expired`."""

from __future__ import annotations

import asyncio
import datetime
import json
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .batch_input import MESSAGES_ENDPOINT
from .batch_store import (CANCELLED, CANCELLING, COMPLETED, EXPIRED, FAILED, LINE_CANCELLED, LINE_EXPIRED,
                          LINE_FAILED, PENDING, SUCCEEDED, BatchConflict)
from .batches_api import COMPLETION_WINDOWS, notify_runner, owned_batch
from .errors import APIError, anthropic_body
from .files_api import batch_store, page_params, tenant_scope, unknown_cursor, visible
from .openai_api import json_body, principal_of

_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENDED = (COMPLETED, EXPIRED, CANCELLED, FAILED)
_RESULT_PAGE = 500


def _time(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _batch_json(request: Request, record, states: dict[str, int]) -> dict:
    ended = record.status in _ENDED
    return {
        "id": record.id, "type": "message_batch",
        "processing_status": "ended" if ended else "canceling" if record.status == CANCELLING else "in_progress",
        "request_counts": {"processing": states.get(PENDING, 0), "succeeded": states.get(SUCCEEDED, 0),
                           "errored": states.get(LINE_FAILED, 0), "canceled": states.get(LINE_CANCELLED, 0),
                           "expired": states.get(LINE_EXPIRED, 0)},
        "created_at": _time(record.created_at), "expires_at": _time(record.expires_at),
        "ended_at": _time(record.completed_at or record.expired_at or record.cancelled_at or record.failed_at),
        "cancel_initiated_at": _time(record.cancelling_at), "archived_at": None,
        "results_url": f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{record.id}/results" if ended else None}


async def _answer(request: Request, store, record) -> JSONResponse:
    return JSONResponse(_batch_json(request, record, await asyncio.to_thread(store.line_states, record.id)))


async def _addressed(request: Request):
    """(store, the caller's message batch the path names); 404 for another tenant's, or for
    a batch of the OpenAI API."""
    store = batch_store(request)
    record = await owned_batch(request, store, principal_of(request))
    if record.endpoint != MESSAGES_ENDPOINT:
        raise APIError(404, f"message batch {record.id!r} does not exist", param="batch_id")
    return store, record


def _input_lines(body) -> bytes:
    """The batch's requests as the batch API's input file (JSONL)."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise APIError(400, "'requests' must be a non-empty list of {\"custom_id\", \"params\"}", param="requests")
    seen, lines = set(), []
    for i, entry in enumerate(requests):
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            raise APIError(400, f"requests[{i}].custom_id must be 1-64 letters, digits, '_' or '-'", param="requests")
        if custom_id in seen:
            raise APIError(400, f"requests[{i}].custom_id {custom_id!r} is used twice", param="requests")
        seen.add(custom_id)
        if not isinstance(entry.get("params"), dict) or entry["params"].get("stream"):
            raise APIError(400, f"requests[{i}].params must be a Messages request, not streamed", param="requests")
        lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": MESSAGES_ENDPOINT,
                                 "body": entry["params"]}))
    return ("\n".join(lines) + "\n").encode()


async def create(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    data = _input_lines(await json_body(request))
    max_lines = getattr(getattr(request.app.state, "settings", None), "batch_max_lines", None)
    if max_lines is not None and data.count(b"\n") > max_lines:
        raise APIError(400, f"more than {max_lines} requests in one batch (batch_max_lines)", param="requests")
    tenant = tenant_scope(request, principal) or principal.tenant
    upload = await asyncio.to_thread(store.add_file, tenant, "batch", "message_batch.jsonl", [data])
    record = await asyncio.to_thread(store.create_batch, tenant, MESSAGES_ENDPOINT, upload.id, "24h",
                                     COMPLETION_WINDOWS["24h"], None)
    notify_runner(request)
    return await _answer(request, store, record)


async def retrieve(request: Request):
    return await _answer(request, *await _addressed(request))


async def list_all(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    limit, _ = page_params(request, 20, 1000)
    before = request.query_params.get("before_id") or None
    cursor = before or request.query_params.get("after_id") or None
    if cursor is not None and visible(request, principal, await asyncio.to_thread(store.get_batch, cursor)) is None:
        raise unknown_cursor(cursor)
    # before_id: the newer batches next to it, read oldest first from it, shown newest first
    records, has_more = await asyncio.to_thread(store.list_batches, tenant_scope(request, principal), limit, cursor,
                                                MESSAGES_ENDPOINT, before is not None)
    records = records[::-1] if before is not None else records
    data = [_batch_json(request, r, await asyncio.to_thread(store.line_states, r.id)) for r in records]
    return JSONResponse({"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


async def cancel(request: Request):
    store, record = await _addressed(request)
    try:
        await asyncio.to_thread(store.request_cancel, record.id)
        notify_runner(request)
    except BatchConflict:  # ended, or finishing: nothing left to cancel
        pass
    return await _answer(request, store, await asyncio.to_thread(store.get_batch, record.id))


def _result(custom_id: str | None, state: str, line: str | None) -> dict:
    """A results line from a batch line's state and its batch API result line."""
    if state == SUCCEEDED:
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": json.loads(line)["response"]["body"]}}
    if state in (LINE_CANCELLED, LINE_EXPIRED):
        return {"custom_id": custom_id, "result": {"type": "canceled" if state == LINE_CANCELLED else "expired"}}
    entry = json.loads(line)
    response = entry.get("response") or {}
    status = response.get("status_code", 400)
    body = response.get("body") or {}
    message = (body.get("error") or {}).get("message") or (entry.get("error") or {}).get("message") or "failed"
    return {"custom_id": custom_id, "result": {"type": "errored", "error": anthropic_body(APIError(status, message))}}


async def results(request: Request):
    store, record = await _addressed(request)
    if record.status not in _ENDED:
        raise APIError(400, f"message batch {record.id!r} has not ended: its results come once it has",
                       param="batch_id")

    async def lines():
        after = 0
        while page := await asyncio.to_thread(store.line_results, record.id, after, _RESULT_PAGE):
            yield "".join(json.dumps(_result(*row[1:])) + "\n" for row in page).encode()
            after = page[-1][0]

    return StreamingResponse(lines(), media_type="application/x-jsonl")


async def delete(request: Request):
    store, record = await _addressed(request)
    try:
        await asyncio.to_thread(store.delete_batch, record.id)
    except BatchConflict:
        raise APIError(409, f"message batch {record.id!r} is still processing: cancel it first",
                       param="batch_id") from None
    return JSONResponse({"id": record.id, "type": "message_batch_deleted"})


routes = [Route("/v1/messages/batches", create, methods=["POST"]),
          Route("/v1/messages/batches", list_all, methods=["GET"]),
          Route("/v1/messages/batches/{batch_id}", retrieve, methods=["GET"]),
          Route("/v1/messages/batches/{batch_id}", delete, methods=["DELETE"]),
          Route("/v1/messages/batches/{batch_id}/cancel", cancel, methods=["POST"]),
          Route("/v1/messages/batches/{batch_id}/results", results, methods=["GET"])]
