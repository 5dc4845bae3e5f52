"""vLLM's score and rerank APIs over embeddings.

`POST /v1/score` (also `/score`) gives the similarity of text pairs: `text_1` and `text_2`
are a string or a list each; one text_1 is scored against every text_2, equal lists pair up
item by item. `POST /v1/rerank` (also `/rerank` and `/v2/rerank`, Jina's and Cohere's shape)
orders `documents` (strings or {"text": ...}) by their score against `query`, best first,
keeping `top_n` (0: all).

Every distinct text is embedded once, in one batch, as /v1/embeddings would (the same pooling,
the base model or one of the caller's adapters, its rate limits and metering); a score is the
dot product of the two L2-normalized vectors, the cosine similarity in [-1, 1], as vLLM scores
with an embedding model. Cross-encoder rerankers, which read a query and a document together
through a classification head, are another kind of model and are not served here.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from .embeddings_api import MAX_INPUTS, embed, pooling_endpoint
from .errors import APIError


def _texts(body: dict, name: str) -> list[str]:
    value = body.get(name)
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise APIError(400, f"'{name}' must be a non-empty string or a non-empty list of them", param=name)
    return value


async def _scores(state, principal, body: dict, pairs: list[tuple[str, str]], param: str,
                  charge) -> tuple[list[float], int]:
    """Each pair's cosine similarity, and the prompt tokens embedded."""
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"{len(texts)} distinct texts to embed; at most {MAX_INPUTS}", param=param)
    request = {"model": body.get("model"), "input": texts, "normalize": True}
    if "truncate_prompt_tokens" in body:
        request["truncate_prompt_tokens"] = body["truncate_prompt_tokens"]
    answer = await embed(state, principal, request, charge)
    vectors = {text: item["embedding"] for text, item in zip(texts, answer["data"])}
    scores = await asyncio.to_thread(lambda: [sum(a * b for a, b in zip(vectors[first], vectors[second]))
                                              for first, second in pairs])  # off the loop, as embed's vectors
    return scores, answer["usage"]["prompt_tokens"]


async def score(state, principal, body: dict, charge=None) -> dict:
    firsts, seconds = _texts(body, "text_1"), _texts(body, "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    elif len(firsts) != len(seconds):
        raise APIError(400, f"'text_1' has {len(firsts)} items and 'text_2' {len(seconds)}: give one text_1 "
                       "to score against every text_2, or lists of the same length to pair up", param="text_2")
    scores, tokens = await _scores(state, principal, body, list(zip(firsts, seconds)), "text_2", charge)
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": body["model"],
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _documents(body: dict) -> list[str]:
    value = body.get("documents")
    if isinstance(value, list):
        value = [d.get("text") if isinstance(d, dict) else d for d in value]
    if not isinstance(value, list) or not value or not all(isinstance(d, str) and d for d in value):
        raise APIError(400, "'documents' must be a non-empty list of strings or of {\"text\": string}",
                       param="documents")
    return value


async def rerank(state, principal, body: dict, charge=None) -> dict:
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise APIError(400, "'query' must be a non-empty string", param="query")
    documents = _documents(body)
    top_n = body.get("top_n") or 0
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise APIError(400, "'top_n' must be a non-negative integer (0: every document)", param="top_n")
    keep_text = body.get("return_documents", True)
    if not isinstance(keep_text, bool):
        raise APIError(400, "'return_documents' must be true or false", param="return_documents")
    scores, tokens = await _scores(state, principal, body, [(query, d) for d in documents], "documents", charge)
    ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n or None]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": body["model"], "usage": {"total_tokens": tokens},
            "results": [{"index": i, "relevance_score": scores[i],
                         **({"document": {"text": documents[i]}} if keep_text else {})} for i in ranked]}


PATHS = {"/v1/score": score, "/score": score, "/v1/rerank": rerank, "/rerank": rerank, "/v2/rerank": rerank}
routes = [pooling_endpoint(path, compute) for path, compute in PATHS.items()]
