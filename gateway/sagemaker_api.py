"""Amazon SageMaker's serving contract, as vLLM's server keeps it, so the same image runs as a
SageMaker endpoint: `GET` or `POST /ping` is the health check, and `POST /invocations` takes
any inference request.

/ping answers as /readyz does (200 once the model is loaded, 503 before or once the engine
has stopped): SageMaker sends traffic to a container from its first 200, and vLLM listens
only after loading while this server listens at once. /invocations runs the body as the
endpoint its fields name: "messages" chat completions, "prompt" completions, "query" and
"documents" rerank, "text_1" and "text_2" score, "input" embeddings. The answer, stream,
errors, tenancy and limits are that endpoint's own.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from .embeddings_api import routes as embedding_routes
from .errors import APIError
from .openai_api import chat_completions, completions, json_body
from .scores_api import routes as score_routes

_BY_PATH = {route.path: route.endpoint for route in embedding_routes + score_routes}
# (fields the body has, the endpoint that takes it), the first match wins
KINDS = ((("messages",), chat_completions), (("prompt",), completions),
         (("query", "documents"), _BY_PATH["/v1/rerank"]), (("text_1", "text_2"), _BY_PATH["/v1/score"]),
         (("input",), _BY_PATH["/v1/embeddings"]))


async def invocations(request: Request):
    body = await json_body(request)  # read once: the endpoint reads it again from Starlette's copy
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    for fields, endpoint in KINDS:
        if all(f in body for f in fields):
            return await endpoint(request)
    raise APIError(400, "the body names no inference endpoint: give 'messages' (chat completions), 'prompt' "
                   "(completions), 'query' and 'documents' (rerank), 'text_1' and 'text_2' (score) or 'input' "
                   "(embeddings)", param="body")


def routes(readyz) -> list[Route]:
    return [Route("/ping", readyz, methods=["GET", "POST"]), Route("/invocations", invocations, methods=["POST"])]
