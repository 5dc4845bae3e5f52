"""Amazon SageMaker's serving contract, as vLLM's server keeps it, so the same image runs as a
SageMaker endpoint: `GET` or `POST /ping` is the health check, and `POST /invocations` takes
any inference request.

/ping answers as /readyz does (200 once the model is loaded, 503 before or once the engine
has stopped): SageMaker sends traffic to a container from its first 200, and vLLM listens
only after loading while this server listens at once. /invocations runs the body as the
endpoint its fields name: "anthropic_version" (Bedrock's Claude bodies) Anthropic's Messages
API, "messages" chat completions, "prompt" completions, "query" and "documents" rerank,
"text_1" and "text_2" score, "input" embeddings. A body without "model" is for the base model,
as an endpoint serves one model and such bodies seldom name it. The answer, stream, errors,
tenancy and limits are that endpoint's own.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.routing import Route

from .embeddings_api import routes as embedding_routes
from .errors import APIError
from .messages_api import messages
from .openai_api import chat_completions, completions, json_body
from .scores_api import routes as score_routes

_BY_PATH = {route.path: route.endpoint for route in embedding_routes + score_routes}
# (fields the body has, the endpoint that takes it), the first match wins
KINDS = ((("anthropic_version",), messages), (("messages",), chat_completions), (("prompt",), completions),
         (("query", "documents"), _BY_PATH["/v1/rerank"]), (("text_1", "text_2"), _BY_PATH["/v1/score"]),
         (("input",), _BY_PATH["/v1/embeddings"]))


async def invocations(request: Request):
    body = await json_body(request)  # read once: the endpoint reads it again from Starlette's copy
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    if "model" not in body:
        request = _with_body(request, {**body, "model": request.app.state.server.model_name})
    for fields, endpoint in KINDS:
        if all(f in body for f in fields):
            return await endpoint(request)
    raise APIError(400, "the body names no inference endpoint: give 'anthropic_version' (Anthropic's Messages "
                   "API), 'messages' (chat completions), 'prompt' "
                   "(completions), 'query' and 'documents' (rerank), 'text_1' and 'text_2' (score) or 'input' "
                   "(embeddings)", param="body")


def _with_body(request: Request, body: dict) -> Request:
    """The request, its body replaced (the rest of its messages, a disconnect, still come)."""
    data, sent = json.dumps(body).encode(), False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)


def routes(readyz) -> list[Route]:
    return [Route("/ping", readyz, methods=["GET", "POST"]), Route("/invocations", invocations, methods=["POST"])]
