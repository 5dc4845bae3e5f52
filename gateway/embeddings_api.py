"""OpenAI's `POST /v1/embeddings`: one vector per input, from the base model or one of the
caller's adapters (so tenants can serve their embedding fine-tunes as LoRA adapters on one
shared base, batched with everything else the engine runs).

A vector is the prompt's final hidden states pooled (engine/pooling.py) as `--pooler-config`
says, else as the model's sentence-transformers config (`1_Pooling/config.json`) does (the
first token's, the mean or the maximum over the tokens), else the last token's (decoder
embedding models such as Qwen3-Embedding). It is L2-normalized, as OpenAI's are, unless the
config or the request's `normalize` (vLLM's) says false; `dimensions` keeps the first N
components, then normalizes (Matryoshka models are trained for that cut). `encoding_format`
"base64" sends float32 little-endian bytes. vLLM's chat form sends `messages` instead of
`input`: one input, as the chat template renders it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from functools import lru_cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loragate.engine import InvalidRequestError, SamplingParams

from . import json_pieces, tracing
from .errors import APIError
from .openai_api import json_body, principal_of, until_disconnect
from .protocol import chat_messages, template_options, truncated, truncation

MAX_INPUTS = 2048  # OpenAI's limit per request


@lru_cache(maxsize=8)
def pooling_of(model_dir: Path) -> str:
    """The pooling a sentence-transformers config asks for, if the model has one (else "last");
    one this server cannot do is a 400 naming it and --pooler-config."""
    config = model_dir / "1_Pooling" / "config.json"
    if not config.is_file():
        return "last"
    try:
        modes = {k.removeprefix("pooling_mode_") for k, v in json.loads(config.read_text()).items()
                 if k.startswith("pooling_mode_") and v is True}
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not an object
        raise APIError(500, f"cannot read the model's {config}: {e}", "server_error") from None
    for mode, pooling in (("lasttoken", "last"), ("cls_token", "first"), ("mean_tokens", "mean"),
                          ("max_tokens", "max")):
        if modes == {mode}:
            return pooling
    raise APIError(400, f"this model's pooling ({', '.join(sorted(modes)) or 'none'}) is not supported: one of "
                   "lasttoken, cls_token, mean_tokens or max_tokens (or start the server with --pooler-config)",
                   param="model")


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(body: dict) -> list[str | list[int]]:
    value = body.get("input")
    if isinstance(value, str) or _is_token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v or _is_token_ids(v) for v in value):
        raise APIError(400, "'input' must be a non-empty string, a list of them, token ids, or a list of those",
                       param="input")
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"'input' holds {len(value)} items; at most {MAX_INPUTS}", param="input")
    return value


def _chat_input(tokenizer, body: dict) -> list[str]:
    """vLLM's chat form of the request: `messages` rendered by the model's chat template (by
    default without the generation prompt), embedded as one input."""
    if body.get("input") is not None:
        raise APIError(400, "give 'input' or 'messages', not both", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; send 'input'", param="messages")
    return [tokenizer.apply_chat_template(chat_messages(body), tokenize=False,
                                          **template_options(body, generation_prompt=False))]


def _token_ids(tokenizer, inputs: list[str | list[int]], special: bool) -> list[list[int]]:
    """Each input's ids, the texts in one call: a fast tokenizer encodes a batch in Rust
    without holding the GIL, so from a worker thread it leaves the event loop free."""
    texts = [t for t in inputs if isinstance(t, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else ())
    return [next(encoded) if isinstance(t, str) else t for t in inputs]


def _vector(values: list[float], dimensions: int | None, normalize: bool, encoding: str):
    values = values[:dimensions] if dimensions else values
    if normalize:
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        values = [v / norm for v in values]
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if encoding == "base64" else values


async def embed(state, principal, body: dict, charge=None) -> dict:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the base model's name or an adapter's name", param="model")
    engine = state.require_engine()
    chat = body.get("messages") is not None
    inputs = _chat_input(engine.tokenizer, body) if chat else _inputs(body)
    # vLLM's: the tokenizer's BOS and such, on top of what a chat template writes itself
    special = body.get("add_special_tokens", not chat)
    if not isinstance(special, bool):
        raise APIError(400, "'add_special_tokens' must be true or false", param="add_special_tokens")
    keep = truncation(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    width = engine.engine.model.config.hidden_size
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                   or not 1 <= dimensions <= width):
        raise APIError(400, f"'dimensions' must be an integer in [1, {width}]", param="dimensions")
    pooling, normalize = state.pooler
    normalize = normalize if body.get("normalize") is None else body["normalize"]
    if not isinstance(normalize, bool):
        raise APIError(400, "'normalize' must be true or false", param="normalize")
    params = SamplingParams(max_tokens=1, temperature=0, pooling=pooling or pooling_of(engine.engine.model_dir))
    adapter = await state.resolve_model(principal, model)
    state.check_capacity(principal.tenant)
    try:
        prompts = truncated(await asyncio.to_thread(_token_ids, engine.tokenizer, inputs, special), keep,
                            engine.engine.max_model_len)
        streams = await engine.add_requests([(ids, params) for ids in prompts], adapter=adapter, tenant=principal.tenant)
    except InvalidRequestError as e:  # the engine says "prompt"; here it is the input
        raise APIError(400, str(e), param="input") from None
    tokens = sum(map(len, prompts))
    state.metrics.prompt((principal.tenant, state.metrics.adapter_label(adapter)), tokens)
    if (trace := tracing.current()) is not None:
        trace.started(model, state.model_name, principal.tenant, state.metrics.adapter_label(adapter), tokens)
    if charge is not None:
        charge(tokens)

    async def final(stream):
        out = None
        async for out in stream:
            pass
        return out.embedding

    try:
        vectors = await asyncio.gather(*(final(s) for s in streams))
    finally:
        for stream in streams:  # a failure or a client gone: the others must not run on
            stream.close()
    # Off the event loop: 2,048 vectors take a fifth of a second, which every stream would wait out.
    data = await asyncio.to_thread(lambda: [{"object": "embedding", "index": i,
                                             "embedding": _vector(v, dimensions, normalize, encoding)}
                                            for i, v in enumerate(vectors)])
    return {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": data}


def pooling_endpoint(path: str, compute) -> Route:
    """A POST route answering `await compute(state, principal, body, charge)` as JSON, counted
    as one of the tenant's open requests and charged its tokens: /v1/embeddings, and the
    score and rerank APIs built on it (gateway/scores_api.py)."""
    async def handler(request: Request):
        state = request.app.state.server
        principal = principal_of(request)
        state.require_engine()
        body = await json_body(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", param="body")
        slot = state.open_tenant_request(principal.tenant, request.headers)
        try:
            answer = await until_disconnect(request, compute(state, principal, body, slot.charge))
            # Rendered in a thread: 2,048 vectors are 25 MB of JSON, over half a second of work.
            text = await asyncio.to_thread(json_pieces.in_pieces, answer)
            return Response(text.encode(), media_type="application/json",
                            headers=slot.response_headers())
        finally:
            slot.release()

    return Route(path, handler, methods=["POST"])


routes = [pooling_endpoint("/v1/embeddings", embed)]
