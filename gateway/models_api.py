"""GET /v1/models and /v1/models/{id}: the base model (and its aliases) and the caller's
adapters, shared ones included, as OpenAI model objects with vLLM's max_model_len; in
Anthropic's shape for its SDK's requests (they carry anthropic-version)."""

from __future__ import annotations

import datetime
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import not_found
from .openai_api import principal_of


def _models(request: Request) -> list[dict]:
    """The base model and the caller's adapters, as OpenAI model objects, with the context
    length (vLLM's max_model_len, which clients read to size prompts) once the model is loaded."""
    state = request.app.state.server
    principal = principal_of(request)
    context = {"max_model_len": state.engine.engine.max_model_len} if state.engine is not None else {}
    data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "loragate", **context}
            for name in state.served_names or (state.model_name,)]
    if state.registry is not None:
        shared = state.shared_tenant
        mine = [(info.name, info) for info in state.registry.list(principal.tenant)]
        if shared is not None and shared != principal.tenant:
            mine += [(f"{shared}/{info.name}", info) for info in state.registry.list(shared)]
        for model_id, info in mine:
            data.append({"id": model_id, "object": "model", "created": int(info.created), "owned_by": info.tenant,
                         "parent": state.model_name, **context})
    return data


def _anthropic_model(entry: dict) -> dict:
    """A model object as Anthropic's SDK reads it (its requests carry anthropic-version)."""
    created = datetime.datetime.fromtimestamp(entry["created"], datetime.timezone.utc)
    return {"type": "model", "id": entry["id"], "display_name": entry["id"],
            "created_at": created.isoformat().replace("+00:00", "Z")}


async def list_models(request: Request):
    data = _models(request)
    if "anthropic-version" in request.headers:
        data = [_anthropic_model(entry) for entry in data]
        return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request):
    """GET /v1/models/{model}: the base model, one of the caller's adapters or a shared one, else 404."""
    model = request.path_params["model"]
    for entry in _models(request):
        if entry["id"] == model:
            return JSONResponse(_anthropic_model(entry) if "anthropic-version" in request.headers else entry)
    raise not_found(f"the model {model!r} does not exist (neither the base model nor one of your adapters)")
