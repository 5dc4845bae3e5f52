"""Tenant-scoped adapter management: POST /v1/adapters (multipart: `name` and the adapter
files, or one .tar.gz/.zip), GET /v1/adapters[/{name}], PUT /v1/adapters/{name} (a new
version), DELETE /v1/adapters/{name}, GET /v1/adapters/{name}/versions (each a request may
pin as "name@N"). Another tenant's adapter is 404 for every verb.

An upload streams into a private temporary directory, is validated completely, and only
then enters the store; a refused upload leaves nothing behind."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .audit import acting_on, audited
from .errors import APIError, not_found
from .openai_api import principal_of
from .uploads import UploadLimits, read_upload_form, save_upload_files

CHUNK = 1 << 20


def registry_of(request: Request):
    state = request.app.state.server
    if state.registry is None:
        state.require_engine()  # the registry comes with the model: same 503 while loading
    return state.registry


def _tenant(request: Request, principal, form_tenant: str | None = None) -> str:
    """Admins act for any tenant (`?tenant=` or a `tenant` form field); others for their own."""
    wanted = request.query_params.get("tenant") or form_tenant
    if wanted and principal.is_admin:
        return wanted
    return principal.tenant


def info_json(info) -> dict:
    return {"id": info.name, "object": "adapter", "name": info.name, "tenant": info.tenant,
            "version": info.version, "sha256": info.sha256, "rank": info.rank,
            "target_modules": list(info.target_modules), "dora": info.dora, "state": str(info.state.value),
            "error": info.error, "created": int(info.created)}


def check_quota(request: Request, tenant: str, stored: list) -> None:
    """403 when the tenant already stores as many adapters as it may (adding one more)."""
    limit = request.app.state.settings.max_adapters_per_tenant
    if limit and len(stored) >= limit:
        raise APIError(403, f"tenant {tenant!r} has {len(stored)} adapters, its limit; delete one "
                       "(DELETE /v1/adapters/{name}) or replace one (PUT) instead", "permission_error",
                       param="name", code="adapter_quota")


async def _chunks(upload: UploadFile):
    while chunk := await upload.read(CHUNK):
        yield chunk


async def _receive_and_register(request: Request, name: str | None, *, replace: bool):
    registry = registry_of(request)
    principal = principal_of(request)
    settings = request.app.state.settings
    limits = UploadLimits(max_total_bytes=settings.max_upload_size)
    form = await read_upload_form(request, "adapter uploads", settings.max_upload_size,
                                  max_files=limits.max_files + 1, max_fields=8)
    tmp = Path(tempfile.mkdtemp(prefix="loragate-upload-"))
    try:
        name = name or form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form needs a 'name' field naming the adapter", param="name")
        tenant = _tenant(request, principal, form.get("tenant") if isinstance(form.get("tenant"), str) else None)
        acting_on(request, tenant, name)
        files = [(v.filename or "", _chunks(v)) for _, v in form.multi_items() if isinstance(v, UploadFile)]
        # One upload of a tenant at a time on this server, so two cannot both pass the quota.
        async with request.app.state.server.tenant_uploads.setdefault(tenant, asyncio.Lock()):
            stored = registry.list(tenant)
            exists = any(i.name == name for i in stored)
            if replace and not exists:
                raise not_found(f"adapter {name!r} does not exist", param="name", code="adapter_not_found")
            if not replace and exists:
                raise APIError(409, f"adapter {name!r} already exists; PUT /v1/adapters/{name} uploads a new version",
                               param="name", code="adapter_exists")
            if not replace:
                check_quota(request, tenant, stored)
            await save_upload_files(files, tmp, limits)
            info = await asyncio.to_thread(registry.register, tenant, name, tmp)
        return JSONResponse(info_json(info), status_code=200 if replace else 201)
    finally:
        await form.close()
        shutil.rmtree(tmp, ignore_errors=True)


@audited("adapter.create")
async def create(request: Request):
    return await _receive_and_register(request, None, replace=False)


@audited("adapter.replace")
async def replace(request: Request):
    return await _receive_and_register(request, request.path_params["name"], replace=True)


async def list_adapters(request: Request):
    registry = registry_of(request)
    principal = principal_of(request)
    if principal.is_admin and not request.query_params.get("tenant"):
        infos = registry.list_all()
    else:
        infos = registry.list(_tenant(request, principal))
    return JSONResponse({"object": "list", "data": [info_json(i) for i in infos]})


async def get_adapter(request: Request):
    registry = registry_of(request)
    principal = principal_of(request)
    return JSONResponse(info_json(registry.get(_tenant(request, principal), request.path_params["name"])))


async def list_versions(request: Request):
    """GET /v1/adapters/{name}/versions: each stored version, oldest first, with the `model`
    that pins it ("name@N")."""
    registry = registry_of(request)
    principal = principal_of(request)
    name = request.path_params["name"]
    tenant = _tenant(request, principal)
    versions = await asyncio.to_thread(registry.versions, tenant, name)
    latest = versions[-1].version
    return JSONResponse({"object": "list", "data": [
        {"object": "adapter.version", "name": name, "version": v.version, "model": f"{name}@{v.version}",
         "sha256": v.sha256, "created": int(v.created), "latest": v.version == latest} for v in versions]})


@audited("adapter.delete")
async def delete_adapter(request: Request):
    registry = registry_of(request)
    principal = principal_of(request)
    name = request.path_params["name"]
    await asyncio.to_thread(registry.delete, _tenant(request, principal), name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


routes = [
    Route("/v1/adapters", create, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters/{name}", get_adapter, methods=["GET"]),
    Route("/v1/adapters/{name}", replace, methods=["PUT"]),
    Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
    Route("/v1/adapters/{name}/versions", list_versions, methods=["GET"]),
]
