"""OpenAI's Responses API: POST /v1/responses, GET / DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

A request is translated into a chat completion (gateway/responses_protocol.py), run as one
(gateway/openai_api.py), and its answer translated back. The answer's `output` holds a
message item (the text) and/or function_call items. Streamed, it is the Responses event
sequence (response.created, output items and their parts, output_text and
function_call_arguments deltas, ..., response.completed, or response.incomplete when
max_output_tokens cut it).

A completed response is stored unless `store` is false (gateway/response_store.py, tenant
scoped): `previous_response_id` continues its conversation, as if its input and answer were
sent again before the new input. Options this server does not run (conversation objects,
background, built-in tools, images and files, reasoning settings, ...) are a 400 naming
them, not an answer that silently ignores them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import APIError, not_found, to_api_error
from .openai_api import collect_answer, json_body, principal_of, stream_chunks, submit_choices, until_disconnect
from .protocol import chat_messages, parse_common
from .response_store import ResponseStore
from .files_api import list_body, page_params, unknown_cursor
from .responses_protocol import chat_body_from, input_items, refuse

log = logging.getLogger("loragate.responses")


class ResponseBuilder:
    """The response object and its output items, for one request."""

    def __init__(self, body: dict, gen, stored: bool):
        self.body, self.gen, self.stored = body, gen, stored
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.output: list[dict] = []

    def message_item(self, text: str, status: str = "completed", logprobs: list | None = None) -> dict:
        return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": status, "role": "assistant",
                "content": [self.text_part(text, logprobs)] if status == "completed" else []}

    @staticmethod
    def text_part(text: str, logprobs: list | None = None) -> dict:
        """logprobs: chat's per-token entries (token, logprob, bytes, top_logprobs), the same shape."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    @staticmethod
    def call_item(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def response(self, status: str, finish_reason: str | None = None, usage: dict | None = None) -> dict:
        body, cut = self.body, finish_reason == "length"
        text_format = (body.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": "incomplete" if cut else status,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "error": None, "model": self.gen.model, "output": self.output if status != "in_progress" else [],
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": self.gen.sampling["temperature"], "top_p": self.gen.sampling["top_p"],
            "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
            "tools": body.get("tools") or [], "text": {"format": text_format}, "truncation": "disabled",
            "previous_response_id": body.get("previous_response_id"), "reasoning": None, "store": self.stored,
            "background": False, "service_tier": "default", "user": body.get("user"),
            "usage": _usage(usage) if usage is not None else None,
        }


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": chat_usage["prompt_tokens_details"],
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


# -- stored responses -------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def response_store_service(app, state):
    """For the app's lifetime: the store under $LORAGATE_HOME/responses (state.response_store),
    unless --response-retention-days is 0. One that cannot open leaves the rest up: responses
    are then not stored (`store: false` in them), and previous_response_id and
    /v1/responses/{id} answer 503."""
    from loragate.engine.models.prepare import loragate_home

    from .settings import GatewaySettings

    settings = getattr(app.state, "settings", None)
    days = getattr(settings, "response_retention_days", GatewaySettings.response_retention_days)
    state.response_retention_days = days
    if days > 0:
        try:
            state.response_store = await asyncio.to_thread(ResponseStore, loragate_home() / "responses", days)
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
        await asyncio.to_thread(_truncate, state, chat, gen, 1 if body.get("instructions") is not None else 0)
    return chat, gen, body.get("store", True) and state.response_store is not None


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


def answer_message(output: list[dict]) -> dict:
    """A response's output items as the chat assistant message they were generated as."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    return {"role": "assistant", "content": text or None, "tool_calls": calls} if calls else \
        {"role": "assistant", "content": text}


async def _save(state, principal, body: dict, chat: dict, response: dict) -> None:
    """Store a completed response with the conversation it closes (not the instructions). A
    store that fails leaves the answer as it is, marked `store: false`."""
    if not response["store"]:
        return
    conversation = chat["messages"][1 if body.get("instructions") is not None else 0:]
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
    if message.get("content") or not calls:  # an empty answer is an empty message, as when streamed
        logprobs = (choice.get("logprobs") or {}).get("content")
        builder.output.append(builder.message_item(message.get("content") or "", logprobs=logprobs))
    builder.output += [builder.call_item(call) for call in calls]
    response = builder.response("completed", choice["finish_reason"], completion["usage"])
    await _save(state, principal, body, chat, response)
    return response


async def responses(request: Request):
    state = request.app.state.server
    principal = principal_of(request)
    state.require_engine()
    body = await json_body(request)
    chat, gen, store = await _parse(state, principal, body)
    slot = state.open_tenant_request(principal.tenant)
    if not gen.stream:
        try:
            return JSONResponse(await until_disconnect(request, _respond(state, principal, body, chat, gen, store)))
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

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class StreamedResponse:
    """Chat completion chunks -> the Responses stream's events (SSE with `event:` lines)."""

    def __init__(self, builder: ResponseBuilder):
        self.builder = builder
        self.sequence = 0
        self.message: dict | None = None  # the message item, once text streams
        self.text = ""  # its text so far
        self.logprobs: list = []  # its tokens' logprobs so far (with include: [LOGPROBS])
        self.unsent = 0  # of those, how many no delta has carried yet
        self.calls: dict[int, dict] = {}  # chat tool-call index -> its open function_call item
        self.finish_reason: str | None = None
        self.final: dict | None = None  # the response object, once the answer is complete

    def completed(self) -> str:
        kind = "response.incomplete" if self.final["status"] == "incomplete" else "response.completed"
        return self.sse(kind, response=self.final)

    def sse(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def from_chunk(self, chunk: dict):
        if not chunk["choices"]:  # the usage chunk: the last
            yield from self._close_items()
            self.final = self.builder.response("completed", self.finish_reason, chunk["usage"])
            return
        choice = chunk["choices"][0]
        delta = choice["delta"]
        entries = (choice.get("logprobs") or {}).get("content") or []
        self.logprobs += entries
        self.unsent += len(entries)
        if delta.get("content"):
            yield from self._text(delta["content"])
        for call in delta.get("tool_calls") or []:
            yield from self._call(call)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def _text(self, piece: str):
        if self.message is None:
            self.message = self.builder.message_item("", status="in_progress")
            self.builder.output.append(self.message)
            index = len(self.builder.output) - 1
            yield self.sse("response.output_item.added", output_index=index, item=self.message)
            yield self.sse("response.content_part.added", item_id=self.message["id"], output_index=index,
                           content_index=0, part=self.builder.text_part(""))
        if not piece:
            return
        self.text += piece
        # a tool-call plan may hold text back: a delta carries every token's entry since the last one
        logprobs = self.logprobs[len(self.logprobs) - self.unsent:] if self.unsent else []
        self.unsent = 0
        yield self.sse("response.output_text.delta", item_id=self.message["id"], output_index=self._index(self.message),
                       content_index=0, delta=piece, logprobs=logprobs)

    def _call(self, call: dict):
        item = self.calls.get(call["index"])
        if item is None:  # a call's first piece names it
            item = self.builder.call_item({"id": call["id"], "function": {"name": call["function"]["name"],
                                                                         "arguments": ""}}, status="in_progress")
            self.calls[call["index"]] = item
            self.builder.output.append(item)
            yield self.sse("response.output_item.added", output_index=self._index(item), item=item)
        piece = call["function"].get("arguments") or ""
        if piece:
            item["arguments"] += piece
            yield self.sse("response.function_call_arguments.delta", item_id=item["id"],
                           output_index=self._index(item), delta=piece)

    def _close_items(self):
        if not self.builder.output:  # nothing was generated: still one (empty) message
            yield from self._text("")
        for item in list(self.builder.output):
            index = self._index(item)
            if item["type"] == "message":
                part = self.builder.text_part(self.text, self.logprobs)
                yield self.sse("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                               text=self.text, logprobs=self.logprobs)
                yield self.sse("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part)
                item["content"], item["status"] = [part], "completed"
            else:
                yield self.sse("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"])
                item["status"] = "completed"
            yield self.sse("response.output_item.done", output_index=index, item=item)

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.builder.output) if it is item)


routes = [Route("/v1/responses", responses, methods=["POST"]),
          Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
          Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
          Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])]
