"""OpenAI's Files API, for batch input and output: POST /v1/files (multipart: `purpose` =
"batch" and `file`, JSONL), GET /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content,
DELETE /v1/files/{id}.

Tenant-scoped like adapters: another tenant's file answers 404, as if absent. An admin key
sees every tenant's files (or one tenant's with `?tenant=`) and uploads for `?tenant=` (or a
`tenant` form field)."""

from __future__ import annotations

import asyncio
import os

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .batch_input import checked_upload_chunks
from .errors import APIError, not_found
from .openai_api import principal_of
from .uploads import read_upload_form

_CHUNK_BYTES = 1 << 20
_MAX_FILENAME_CHARS = 255


def batch_store(request: Request):
    store = getattr(request.app.state, "batch_store", None)
    if store is None:
        reason = getattr(request.app.state, "batch_store_error", None) or "the batch API is not running"
        raise APIError(503, reason, "server_error", code="batches_unavailable")
    return store


def tenant_scope(request: Request, principal) -> str | None:
    """The tenant whose objects the caller may see; None (all of them) for an admin without ?tenant=."""
    if principal.is_admin:
        return request.query_params.get("tenant") or None
    return principal.tenant


def page_params(request: Request, default_limit: int, max_limit: int) -> tuple[int, str | None]:
    raw = request.query_params.get("limit")
    if raw is None:
        limit = default_limit
    elif raw.isdigit() and 1 <= int(raw) <= max_limit:
        limit = int(raw)
    else:
        raise APIError(400, f"'limit' must be an integer between 1 and {max_limit}", param="limit")
    return limit, request.query_params.get("after") or None


def list_body(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def unknown_cursor(after: str) -> APIError:
    return APIError(400, f"'after' names no object in this list: {after!r}", param="after")


def visible(request: Request, principal, record):
    """`record` if the caller may see it, else None (another tenant's object is as good as absent)."""
    scope = tenant_scope(request, principal)
    return record if record is not None and (scope is None or record.tenant == scope) else None


async def owned_file(request: Request, store, principal, file_id: str, param: str = "file_id"):
    record = visible(request, principal, await asyncio.to_thread(store.get_file, file_id))
    if record is None:
        raise not_found(f"file {file_id!r} does not exist", param=param, code="file_not_found")
    return record


def file_json(record) -> dict:
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": record.created_at,
            "filename": record.filename, "purpose": record.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


async def upload_file(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    settings = request.app.state.settings
    form = await read_upload_form(request, "file uploads", settings.max_upload_size, max_files=1, max_fields=4,
                                  expected=" with 'purpose' and 'file'", param="file")
    try:
        purpose = form.get("purpose")
        if purpose != "batch":
            raise APIError(400, f"'purpose' must be \"batch\" (the only purpose this server serves), got {purpose!r}",
                           param="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "the form needs a 'file' part holding the JSONL input", param="file")
        tenant = principal.tenant
        form_tenant = form.get("tenant")
        if principal.is_admin and (request.query_params.get("tenant") or isinstance(form_tenant, str) and form_tenant):
            tenant = request.query_params.get("tenant") or form_tenant
        filename = os.path.basename(upload.filename or "") or "input.jsonl"
        chunks = checked_upload_chunks(upload.file, settings.max_upload_size,
                                       settings.batch_max_lines)
        record = await asyncio.to_thread(store.add_file, tenant, "batch", filename[:_MAX_FILENAME_CHARS], chunks)
    finally:
        await form.close()
    return JSONResponse(file_json(record))


async def list_files(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    limit, after = page_params(request, 10_000, 10_000)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "'order' must be \"asc\" or \"desc\"", param="order")
    if after is not None and visible(request, principal, await asyncio.to_thread(store.get_file, after)) is None:
        raise unknown_cursor(after)
    try:
        records, has_more = await asyncio.to_thread(store.list_files, tenant_scope(request, principal),
                                                    request.query_params.get("purpose") or None, limit, after,
                                                    order == "asc")
    except KeyError:  # the cursor's file was deleted meanwhile
        raise unknown_cursor(after) from None
    return JSONResponse(list_body([file_json(r) for r in records], has_more))


async def get_file(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    return JSONResponse(file_json(await owned_file(request, store, principal, request.path_params["file_id"])))


async def file_content(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    record = await owned_file(request, store, principal, request.path_params["file_id"])
    try:
        # Opened now: a DELETE while the body streams no longer matters to this response.
        src = await asyncio.to_thread(open, store.file_path(record.id), "rb")  # closed by chunks()
    except FileNotFoundError:
        raise not_found(f"file {record.id!r} does not exist", param="file_id", code="file_not_found") from None

    async def chunks():
        try:
            while chunk := await asyncio.to_thread(src.read, _CHUNK_BYTES):
                yield chunk
        finally:
            src.close()

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(os.fstat(src.fileno()).st_size),
                                      "Content-Disposition": f'attachment; filename="{record.id}.jsonl"'})


async def delete_file(request: Request):
    principal = principal_of(request)
    store = batch_store(request)
    record = await owned_file(request, store, principal, request.path_params["file_id"])
    await asyncio.to_thread(store.delete_file, record.id)
    return JSONResponse({"id": record.id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
]
