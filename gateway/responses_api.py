"""OpenAI's Responses API: POST /v1/responses, GET / DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

A request is translated into a chat completion (gateway/responses_protocol.py), run as one
(gateway/openai_api.py), and its answer translated back (gateway/responses_objects.py).
The answer's `output` holds a message item (the text) and/or function_call items. Streamed,
it is the Responses event sequence (response.created, output items and their parts,
output_text and function_call_arguments deltas, ..., response.completed, or
response.incomplete when max_output_tokens cut it).

A completed response is stored unless `store` is false (gateway/response_store.py, tenant
scoped): `previous_response_id` continues its conversation, as if its input and answer were
sent again before the new input. Options this server does not run (conversation objects,
background, built-in tools, images and files, ...) are a 400 naming
them, not an answer that silently ignores them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import APIError, not_found, to_api_error
from .files_api import list_body, page_params, unknown_cursor
from .openai_api import collect_answer, json_body, principal_of, stream_chunks, submit_choices, until_disconnect
from .protocol import chat_messages, parse_common
from .response_store import ResponseStore
from .responses_objects import ResponseBuilder, StreamedResponse, answer_message
from .responses_protocol import chat_body_from, input_items, refuse

log = logging.getLogger("loragate.responses")


# -- stored responses -------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def response_store_service(app, state):
    """For the app's lifetime: the store under $LORAGATE_HOME/responses (state.response_store),
    unless --response-retention-days is 0. One that cannot open leaves the rest up: responses
    are then not stored (`store: false` in them), and previous_response_id and
    /v1/responses/{id} answer 503."""
    from loragate.engine.config import parse_bytes
    from loragate.engine.models.prepare import loragate_home

    from .settings import GatewaySettings

    settings = getattr(app.state, "settings", None)
    days = getattr(settings, "response_retention_days", GatewaySettings.response_retention_days)
    state.response_retention_days = days
    if days > 0:
        try:
            state.response_store = await asyncio.to_thread(
                ResponseStore, loragate_home() / "responses", days,
                parse_bytes(getattr(settings, "response_store_max_bytes_per_tenant",
                                    GatewaySettings.response_store_max_bytes_per_tenant)))
        except (OSError, sqlite3.Error) as e:
            log.error("stored responses unavailable: cannot open their store under %s: %s",
                      loragate_home() / "responses", e)
    try:
        yield
    finally:
        if state.response_store is not None:
            state.response_store.close()
            state.response_store = None


def _store_of(state, param: str | None) -> ResponseStore:
    if state.response_store is None and state.response_retention_days == 0:
        raise APIError(400, "this server stores no responses (--response-retention-days 0): send the earlier "
                       "items again in 'input'", param=param, code="responses_not_stored")
    if state.response_store is None:
        raise APIError(503, "stored responses are not available on this server (see its log)", "server_error",
                       param=param, code="responses_store_unavailable")
    return state.response_store


async def _stored(state, principal, response_id: str, param: str | None):
    stored = await asyncio.to_thread(_store_of(state, param).get, response_id)
    if stored is None or (stored.tenant != principal.tenant and not principal.is_admin):
        raise not_found(f"response {response_id!r} does not exist (or is older than "
                        f"{state.response_retention_days} days)", param=param, code="response_not_found")
    return stored


async def _parse(state, principal, body: dict):
    """(chat body, its GenerationRequest, whether the answer is to be stored)."""
    history = []
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is not None:
        if not isinstance(previous, str):
            raise refuse("'previous_response_id' must be a string", "previous_response_id")
        history = (await _stored(state, principal, previous, "previous_response_id")).conversation
    chat = chat_body_from(body, history)
    gen = parse_common(chat, chat=True)
    if body.get("truncation") == "auto":  # tokenizing a long conversation again and again: off the loop
        await asyncio.to_thread(_truncate, state, chat, gen, _first_turn(body))
    return chat, gen, body.get("store", True) and state.response_store is not None


def _first_turn(body: dict) -> int:
    """Where the conversation starts in the chat messages: after the instructions, if any."""
    return 1 if body.get("instructions") is not None else 0


def _truncate(state, chat: dict, gen, first: int) -> None:
    """truncation 'auto': drop the conversation's oldest messages (never the instructions,
    never the last message) until the prompt leaves room for max_output_tokens (or one token)
    in the context; a tool result whose call was dropped goes with it."""
    engine = state.require_engine()
    room = engine.engine.max_model_len - (gen.max_tokens or 1)
    messages = chat["messages"]

    def prompt_len() -> int:
        return len(engine.tokenizer.apply_chat_template(
            chat_messages({"messages": messages}), tools=gen.tools.shown if gen.tools else None,
            add_generation_prompt=True, tokenize=True, return_dict=False))

    while len(messages) - first > 1 and prompt_len() > room:
        del messages[first]
        while len(messages) - first > 1 and messages[first]["role"] == "tool":
            del messages[first]


async def _save(state, principal, body: dict, chat: dict, response: dict) -> None:
    """Store a completed response with the conversation it closes (not the instructions). A
    store that fails leaves the answer as it is, marked `store: false`."""
    if not response["store"]:
        return
    conversation = chat["messages"][_first_turn(body):]
    conversation.append(answer_message(response["output"]))
    try:
        await asyncio.to_thread(state.response_store.put, principal.tenant, response, conversation,
                                input_items(body))
    except sqlite3.Error as e:
        log.error("response %s could not be stored: %s", response["id"], e)
        response["store"] = False


async def get_response(request: Request):
    state, principal = request.app.state.server, principal_of(request)
    return JSONResponse((await _stored(state, principal, request.path_params["response_id"], None)).response)


async def list_input_items(request: Request):
    """GET /v1/responses/{id}/input_items: the request's input items, newest first unless
    ?order=asc, paged with ?limit= (1-100, default 20) and ?after=<item id>."""
    state, principal = request.app.state.server, principal_of(request)
    items = (await _stored(state, principal, request.path_params["response_id"], None)).input_items
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise refuse("'order' must be asc or desc", "order")
    limit, after = page_params(request, 20, 100)
    items = items[::-1] if order == "desc" else items
    if after is not None:
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), None)
        if start is None:
            raise unknown_cursor(after)
        items = items[start:]
    return JSONResponse(list_body(items[:limit], len(items) > limit))


async def delete_response(request: Request):
    state, principal = request.app.state.server, principal_of(request)
    response_id = request.path_params["response_id"]
    await _stored(state, principal, response_id, None)
    await asyncio.to_thread(state.response_store.delete, response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


# -- answering --------------------------------------------------------------------------------

async def respond(state, principal, body: dict) -> dict:
    """The response object POST /v1/responses answers with status 200 for this body, run as
    `principal` (not streamed); errors raise as the handler raises them. The batch runner's."""
    chat, gen, store = await _parse(state, principal, body)
    if gen.stream:
        raise refuse("'stream' is not supported here: the whole response is returned at once", "stream")
    return await _respond(state, principal, body, chat, gen, store)


async def _respond(state, principal, body: dict, chat: dict, gen, store: bool) -> dict:
    completion = await collect_answer(state, principal, chat, gen, chat=True)
    builder = ResponseBuilder(body, gen, store)
    choice = completion["choices"][0]
    message = choice["message"]
    calls = message.get("tool_calls") or []
    if message.get("reasoning"):
        builder.output.append(builder.reasoning_item(message["reasoning"]))
    if message.get("content") or not calls:  # an empty answer is an empty message, as when streamed
        logprobs = (choice.get("logprobs") or {}).get("content")
        builder.output.append(builder.message_item(message.get("content") or "", logprobs=logprobs))
    builder.output += [builder.call_item(call) for call in calls]
    response = builder.response("completed", choice["finish_reason"], completion["usage"],
                                {k: v for k, v in completion.items() if k == "metrics"})
    await _save(state, principal, body, chat, response)
    return response


async def responses(request: Request):
    state = request.app.state.server
    principal = principal_of(request)
    state.require_engine()
    body = await json_body(request)
    chat, gen, store = await _parse(state, principal, body)
    slot = state.open_tenant_request(principal.tenant, request.headers)
    gen.charge = slot.charge
    if not gen.stream:
        try:
            return JSONResponse(await until_disconnect(request, _respond(state, principal, body, chat, gen, store)),
                                headers=slot.response_headers())
        finally:
            slot.release()
    gen.include_usage = True  # the usage goes into response.completed
    try:
        prompts, choices, streams = await submit_choices(state, principal, chat, gen, chat=True)
    except BaseException:
        slot.release()
        raise
    events = StreamedResponse(ResponseBuilder(body, gen, store))

    async def sse():
        try:
            yield events.sse("response.created", response=events.builder.response("in_progress"))
            yield events.sse("response.in_progress", response=events.builder.response("in_progress"))
            async with contextlib.aclosing(stream_chunks(state, gen, prompts, choices, streams, chat=True)) as chunks:
                async for piece in chunks:
                    for event in events.from_chunk(piece):
                        yield event
            await _save(state, principal, body, chat, events.final)  # stored before the client hears it is done
            yield events.completed()
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
            error = to_api_error(e).body()["error"]
            yield events.sse("error", code=error.get("code"), message=error["message"], param=error.get("param"))
        finally:
            slot.release()

    return StreamingResponse(slot.reported(sse()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **slot.response_headers()})


routes = [Route("/v1/responses", responses, methods=["POST"]),
          Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
          Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
          Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])]
