"""The served model's tokenizer over HTTP, in vLLM's shapes: `POST /tokenize`,
`POST /detokenize`, `GET /tokenizer_info`. Clients count tokens against the context and
build token-id prompts without a copy of the tokenizer; lm-evaluation-harness's
`local-completions` finds these routes and then tokenizes through them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import APIError
from .openai_api import json_body, principal_of
from .protocol import chat_messages
from .reasoning import template_kwargs


async def _engine_and_body(request: Request):
    state = request.app.state.server
    principal_of(request)  # the same keys as inference
    engine = state.require_engine()
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    return engine, body


async def tokenize(request: Request):
    engine, body = await _engine_and_body(request)
    tok = engine.tokenizer
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise APIError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
    if "messages" in body:  # a chat, as the chat endpoint would render it
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template", param="messages")
        tokens = tok.apply_chat_template(chat_messages(body), add_generation_prompt=body.get("add_generation_prompt", True)
                                         is True, tokenize=True, return_dict=False, **template_kwargs(body))
    elif isinstance(body.get("prompt"), str):
        tokens = tok.encode(body["prompt"], add_special_tokens=special)
    else:
        raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.engine.max_model_len})


async def detokenize(request: Request):
    engine, body = await _engine_and_body(request)
    tokens = body.get("tokens")
    vocab = engine.engine.model.config.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": engine.tokenizer.decode(tokens)})


async def tokenizer_info(request: Request):
    principal_of(request)
    engine = request.app.state.server.require_engine()
    tok = engine.tokenizer
    return JSONResponse({
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": engine.engine.max_model_len,
    })


routes = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
]
