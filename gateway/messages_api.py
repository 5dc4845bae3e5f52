"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens, for
clients written against Anthropic's SDK (or tools pointed at a local server that way), with
the tenants, adapters (`model`), limits and metering of chat completions. The key may come as
`x-api-key`, Anthropic's header (gateway/auth.py).

A request runs as the chat completion it amounts to (gateway/messages_protocol.py); its answer
is a message of thinking, text and tool_use blocks with stop_reason end_turn, max_tokens,
stop_sequence (and which) or tool_use. Streamed, it is Anthropic's event sequence:
message_start, then per block content_block_start, its deltas (text_delta, thinking_delta,
input_json_delta) and content_block_stop, then message_delta (the stop reason, the output
tokens) and message_stop. Errors have Anthropic's shape, {"type": "error", "error": {"type",
"message"}}, with the status they have on the chat endpoint (gateway/errors.py)."""

from __future__ import annotations

import contextlib
import json
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import APIError, anthropic_body, to_api_error
from .messages_protocol import chat_body_from
from .openai_api import collect_answer, json_body, principal_of, stream_chunks, submit_choices, until_disconnect
from .protocol import chat_messages, parse_common


def stop_of(finish_reason: str | None, stop_reason, stop_sequences, called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a chat choice's finish_reason and vLLM stop_reason;
    `called`: it made tool calls (a named tool_choice's finish with 'stop' on chat)."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "tool_calls" or called:
        return "tool_use", None
    if isinstance(stop_reason, str) and stop_reason in (stop_sequences or ()):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_use(call: dict) -> dict:
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:  # never expected: the tool-call parser checks the arguments are JSON
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments}


def message_of(body: dict, completion: dict) -> dict:
    choice = completion["choices"][0]
    message = choice["message"]
    content = [{"type": "thinking", "thinking": message["reasoning"], "signature": ""}] \
        if message.get("reasoning") else []
    calls = [_tool_use(call) for call in message.get("tool_calls") or []]
    if message.get("content") or not calls:
        content.append({"type": "text", "text": message.get("content") or ""})
    stop_reason, stop_sequence = stop_of(choice["finish_reason"], choice.get("stop_reason"),
                                         body.get("stop_sequences"), bool(calls))
    usage = completion["usage"]
    return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": body.get("model"),
            "content": content + calls, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}


class MessageEvents:
    """A streamed chat completion's chunks -> Anthropic's stream events (SSE text)."""

    def __init__(self, body: dict, input_tokens: int):
        self.body, self.input_tokens = body, input_tokens
        self.index = -1  # the open content block's, -1 before the first
        self.open_kind = None  # "text", "thinking" or a tool call's chat index
        self.finish = (None, None)  # the last choice's finish_reason and stop_reason
        self.called = False  # a tool_use block was sent
        self.output_tokens = 0

    @staticmethod
    def sse(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

    def start(self) -> str:
        message = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant",
                   "model": self.body.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return self.sse("message_start", message=message)

    def from_chunk(self, chunk: dict):
        if not chunk["choices"]:  # the usage chunk: the last
            self.output_tokens = chunk["usage"]["completion_tokens"]
            return
        choice = chunk["choices"][0]
        delta = choice["delta"]
        if delta.get("reasoning"):
            yield from self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": delta["reasoning"]})
        if delta.get("content"):
            yield from self._block("text", {"type": "text", "text": ""})
            yield self._delta({"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or []:
            if call.get("id"):  # a call's first piece names it
                self.called = True
                yield from self._block(call["index"], {"type": "tool_use", "id": call["id"],
                                                       "name": call["function"]["name"], "input": {}})
            if call["function"].get("arguments"):
                yield self._delta({"type": "input_json_delta", "partial_json": call["function"]["arguments"]})
        if choice.get("finish_reason"):
            self.finish = (choice["finish_reason"], choice.get("stop_reason"))

    def _block(self, kind, block: dict):
        if self.open_kind == kind:
            return
        yield from self._close()
        self.index += 1
        self.open_kind = kind
        yield self.sse("content_block_start", index=self.index, content_block=block)

    def _delta(self, delta: dict) -> str:
        return self.sse("content_block_delta", index=self.index, delta=delta)

    def _close(self):
        if self.open_kind is not None:
            yield self.sse("content_block_stop", index=self.index)
            self.open_kind = None

    def end(self):
        if self.index < 0:  # nothing was generated: still one (empty) text block, as unstreamed
            yield from self._block("text", {"type": "text", "text": ""})
        yield from self._close()
        stop_reason, stop_sequence = stop_of(*self.finish, self.body.get("stop_sequences"), self.called)
        yield self.sse("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                       usage={"output_tokens": self.output_tokens})
        yield self.sse("message_stop")


def _thinking_switch(tokenizer, body: dict, chat: dict) -> None:
    """Anthropic's `thinking`, on a model whose chat template has Qwen3's switch
    (enable_thinking): disabled turns thinking off, the other types on. Other models think
    as their templates have them."""
    thinking = body.get("thinking")
    if thinking is not None and "enable_thinking" in (getattr(tokenizer, "chat_template", None) or ""):
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] != "disabled"}


def _prepared(state, body, priority: int | None = None):
    """(chat body, its GenerationRequest) for a Messages request."""
    chat = chat_body_from(body)
    _thinking_switch(state.require_engine().tokenizer, body, chat)
    if priority is not None:
        chat["priority"] = priority
    return chat, parse_common(chat, chat=True)


async def _answer(state, principal, body: dict, chat: dict, gen) -> dict:
    return message_of(body, await collect_answer(state, principal, chat, gen, chat=True))


async def answer_message(state, principal, body: dict, priority: int | None = None) -> dict:
    """The message POST /v1/messages answers for this body, run as `principal` at `priority`
    (not streamed); errors raise as the handler raises them. The batch runner's."""
    chat, gen = _prepared(state, body, priority)
    if gen.stream:
        raise APIError(400, "'stream' is not supported here: the whole message is returned at once", param="stream")
    return await _answer(state, principal, body, chat, gen)


async def messages(request: Request):
    state = request.app.state.server
    principal = principal_of(request)
    state.require_engine()
    body = await json_body(request)
    chat, gen = _prepared(state, body)
    slot = state.open_tenant_request(principal.tenant, request.headers)
    gen.charge = slot.charge
    if not gen.stream:
        try:
            message = await until_disconnect(request, _answer(state, principal, body, chat, gen))
            return JSONResponse(message, headers=slot.response_headers())
        finally:
            slot.release()
    gen.include_usage = True  # the output tokens go into message_delta
    try:
        prompts, choices, streams = await submit_choices(state, principal, chat, gen, chat=True)
    except BaseException:
        slot.release()
        raise
    events = MessageEvents(body, len(prompts[0]))

    async def sse():
        try:
            yield events.start()
            async with contextlib.aclosing(stream_chunks(state, gen, prompts, choices, streams, chat=True)) as chunks:
                async for piece in chunks:
                    for event in events.from_chunk(piece):
                        yield event
            for event in events.end():
                yield event
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
            yield events.sse("error", error=anthropic_body(to_api_error(e))["error"])
        finally:
            slot.release()

    return StreamingResponse(slot.reported(sse()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **slot.response_headers()})


async def count_tokens(request: Request):
    """The prompt's tokens as /v1/messages would run it: {"input_tokens": N}."""
    state = request.app.state.server
    principal_of(request)
    engine = state.require_engine()
    body = await json_body(request)
    chat, gen = _prepared(state, {"max_tokens": 1, **body} if isinstance(body, dict) else body)  # none asked here
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template", param="messages")
    ids = tok.apply_chat_template(chat_messages(chat), tools=gen.tools.shown if gen.tools else None, tokenize=True,
                                  return_dict=False, **gen.template_kwargs)
    return JSONResponse({"input_tokens": len(ids)})


routes = [Route("/v1/messages", messages, methods=["POST"]),
          Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
