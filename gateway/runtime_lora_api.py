"""vLLM's runtime LoRA API, for tools written against it: POST /v1/load_lora_adapter
{"lora_name", "lora_path", "load_inplace"} and POST /v1/unload_lora_adapter {"lora_name"}.

A thin door onto the adapter store: lora_path is a PEFT output directory on this server, stored
as `--lora-modules` stores one (adapters/preload.py: its two files, validated as an upload).
lora_name is `[tenant/]name`. Off unless `--allow-runtime-lora-updating` (vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING), since it reads server paths; with API keys only the admin
key may call it (a tenant could otherwise store another tenant's directory as its own), naming
the tenant. Answers as vLLM does: plain-text success, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loragate.adapters.errors import AdapterError, AdapterNotFound
from loragate.adapters.preload import LoraModule, check_directories, split_adapter_key, store_module

from .adapters_api import check_quota, registry_of
from .audit import acting_on, audited
from .errors import APIError, not_found
from .openai_api import json_body, principal_of


def _target(request: Request, body: dict) -> tuple[str, str]:
    """(tenant, name) the caller may act on, from lora_name."""
    state = request.app.state.server
    if not request.app.state.settings.allow_runtime_lora_updating:
        raise APIError(404, "the runtime LoRA API is off: start the server with --allow-runtime-lora-updating, "
                       "or upload adapters with POST /v1/adapters", "not_found_error")
    principal = principal_of(request)
    lora_name = body.get("lora_name")
    if not isinstance(lora_name, str) or not lora_name:
        raise APIError(400, "'lora_name' is required: the adapter's name, '[tenant/]name'", param="lora_name")
    try:
        tenant, name = split_adapter_key(lora_name)
    except AdapterError as e:
        raise APIError(400, f"'lora_name': {e.message}", param="lora_name") from None
    acting_on(request, tenant or principal.tenant, name)
    if state.keys.is_open:
        return principal.tenant, name
    if not principal.is_admin:
        raise APIError(403, "with API keys only the admin key may load adapters from server paths; tenants upload "
                       "theirs with POST /v1/adapters", "permission_error")
    if not tenant:
        raise APIError(400, "'lora_name' must name the tenant, 'tenant/name'", param="lora_name")
    return tenant, name


@audited("adapter.runtime_load")
async def load_lora_adapter(request: Request):
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    tenant, name = _target(request, body)
    path = body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise APIError(400, "'lora_path' is required: a PEFT adapter directory on the server", param="lora_path")
    inplace = body.get("load_inplace", False)
    if not isinstance(inplace, bool):
        raise APIError(400, "'load_inplace' must be a boolean", param="load_inplace")
    module = LoraModule(tenant, name, Path(path))
    try:
        check_directories([module])
    except ValueError as e:
        raise APIError(400, f"'lora_path': {e}", param="lora_path") from None
    registry = registry_of(request)
    async with request.app.state.server.tenant_uploads.setdefault(tenant, asyncio.Lock()):
        stored = registry.list(tenant)
        if any(i.name == name for i in stored):
            if not inplace:
                raise APIError(400, f"the lora adapter {name!r} has already been loaded; pass \"load_inplace\": "
                               "true to store these files as its next version", param="lora_name",
                               code="adapter_exists")
        else:
            check_quota(request, tenant, stored)
        try:
            await asyncio.to_thread(store_module, registry, module, tenant)
        except AdapterError as e:
            raise AdapterError(e.code, f"'lora_path' {path}: {e.message}") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@audited("adapter.runtime_unload")
async def unload_lora_adapter(request: Request):
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    tenant, name = _target(request, body)
    try:
        await asyncio.to_thread(registry_of(request).delete, tenant, name)
    except AdapterNotFound:
        raise not_found(f"the lora adapter {name!r} cannot be found", param="lora_name",
                        code="adapter_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


routes = [
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
