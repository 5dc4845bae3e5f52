"""OpenAI's Responses API, stateless: POST /v1/responses.

A request is translated into a chat completion (gateway/openai_api.py) and its answer back:
`instructions` and `input` (a string, or message, function_call and function_call_output
items) become the chat messages; `max_output_tokens`, `temperature`, `top_p`, `tools`
(function tools), `tool_choice`, `parallel_tool_calls` and `text.format` (text, json_object,
json_schema) their chat counterparts. The answer's `output` holds a message item (the text)
and/or function_call items. Streamed, it is the Responses event sequence (response.created,
output items and their parts, output_text and function_call_arguments deltas, ...,
response.completed, or response.incomplete when max_output_tokens cut it).

Nothing is stored: a conversation goes on by sending its earlier items again in `input`.
Options that need stored state or something this server does not run (previous_response_id,
conversation, background, built-in tools, images and files, reasoning settings, ...) are a
400 naming them, not an answer that silently ignores them."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loragate.engine.errors import InvalidRequestError

from .errors import to_api_error
from .openai_api import _collect, _submit, _until_disconnect, json_body, principal_of, stream_chunks
from .protocol import parse_common

# Extensions passed through to sampling as on the chat endpoint (vLLM's, and OpenAI chat's).
_PASSED_THROUGH = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "speculative")
_REFUSED = {
    "previous_response_id": "responses are not stored: send the earlier items again in 'input'",
    "conversation": "conversations are not stored: send the earlier items again in 'input'",
    "prompt": "stored prompt templates are not supported",
    "background": "background responses are not supported",
    "reasoning": "reasoning settings are not supported",
    "max_tool_calls": "'max_tool_calls' is not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses (use /v1/chat/completions)",
}


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param)


def _text_of(content, where: str) -> str:
    """A message's content: a string, or text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") in ("input_text", "output_text", "text") and isinstance(p.get("text"), str)
               for p in content):
            return "".join(p["text"] for p in content)
        raise _bad(f"{where}: only text content is supported (input_text, output_text)", "input")
    raise _bad(f"{where}.content must be a string or a list of text parts", "input")


def chat_messages_from(body: dict) -> list[dict]:
    """`instructions` and `input` as chat messages (consecutive function_call items are one
    assistant turn with several tool calls, as the chat template expects)."""
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a non-empty string or list of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where} needs a role of user, assistant, system or developer", "input")
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _bad(f"{where}: a function_call needs string call_id, name and arguments", "input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}: a function_call_output needs a string call_id", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(output, where) if not isinstance(output, str) else output})
        else:
            raise _bad(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                       "function_call_output)", "input")
    return messages


def _chat_tools(body: dict) -> tuple[list | None, object]:
    """Responses' flat function tools and tool_choice in chat's nested shape."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list", "tools")
        out = []
        for tool in tools:
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise _bad(f"only function tools are supported, not {kind!r}", "tools")
            out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                                "strict") if k in tool}})
        tools = out or None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                       "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(body: dict):
    """text.format -> chat's response_format (None: free text)."""
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise _bad("'text' must be an object with an optional 'format' object", "text")
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise _bad(f"text.format type {kind!r} is not supported (text, json_object, json_schema)", "text")


def chat_body_from(body: dict) -> dict:
    """The chat completions request a Responses request amounts to."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "body")
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False, 0):
            raise _bad(why, name)
    if body.get("truncation") not in (None, "disabled"):
        raise _bad("only 'truncation': 'disabled' is supported: a prompt over the context is a 400", "truncation")
    if body.get("include"):
        raise _bad("'include' is not supported: nothing extra can be included", "include")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise _bad("'metadata' must be an object of strings", "metadata")
    chat = {"model": body.get("model"), "messages": chat_messages_from(body)}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "stream", *_PASSED_THROUGH):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools, choice = _chat_tools(body)
    if tools is not None:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    return chat


class ResponseBuilder:
    """The response object and its output items, for one request."""

    def __init__(self, body: dict, gen):
        self.body, self.gen = body, gen
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.output: list[dict] = []

    def message_item(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": status, "role": "assistant",
                "content": [self.text_part(text)] if status == "completed" else []}

    @staticmethod
    def text_part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

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
            "previous_response_id": None, "reasoning": None, "store": False, "background": False,
            "service_tier": "default", "user": body.get("user"),
            "usage": _usage(usage) if usage is not None else None,
        }


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": chat_usage["prompt_tokens_details"],
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def _parse(body: dict):
    chat = chat_body_from(body)
    return chat, parse_common(chat, chat=True)


async def respond(state, principal, body: dict) -> dict:
    """The response object POST /v1/responses answers with status 200 for this body, run as
    `principal` (not streamed); errors raise as the handler raises them. The batch runner's."""
    chat, gen = _parse(body)
    if gen.stream:
        raise _bad("'stream' is not supported here: the whole response is returned at once", "stream")
    return await _respond(state, principal, body, chat, gen)


async def _respond(state, principal, body: dict, chat: dict, gen) -> dict:
    completion = await _collect(state, principal, chat, gen, chat=True)
    builder = ResponseBuilder(body, gen)
    choice = completion["choices"][0]
    message = choice["message"]
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:  # an empty answer is an empty message, as when streamed
        builder.output.append(builder.message_item(message.get("content") or ""))
    builder.output += [builder.call_item(call) for call in calls]
    return builder.response("completed", choice["finish_reason"], completion["usage"])


async def responses(request: Request):
    state = request.app.state.server
    principal = principal_of(request)
    state.require_engine()
    body = await json_body(request)
    chat, gen = _parse(body)
    slot = state.open_tenant_request(principal.tenant)
    if not gen.stream:
        try:
            return JSONResponse(await _until_disconnect(request, _respond(state, principal, body, chat, gen)))
        finally:
            slot.release()
    gen.include_usage = True  # the usage goes into response.completed
    try:
        prompts, choices, streams = await _submit(state, principal, chat, gen, chat=True)
    except BaseException:
        slot.release()
        raise
    events = StreamedResponse(ResponseBuilder(body, gen))

    async def sse():
        try:
            yield events.sse("response.created", response=events.builder.response("in_progress"))
            yield events.sse("response.in_progress", response=events.builder.response("in_progress"))
            async with contextlib.aclosing(stream_chunks(state, gen, prompts, choices, streams, chat=True)) as chunks:
                async for piece in chunks:
                    for event in events.from_chunk(piece):
                        yield event
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
        self.calls: dict[int, dict] = {}  # chat tool-call index -> its open function_call item
        self.finish_reason: str | None = None

    def sse(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def from_chunk(self, chunk: dict):
        if not chunk["choices"]:  # the usage chunk: the last
            yield from self._close_items()
            done = self.builder.response("completed", self.finish_reason, chunk["usage"])
            yield self.sse("response.incomplete" if done["status"] == "incomplete" else "response.completed",
                           response=done)
            return
        choice = chunk["choices"][0]
        delta = choice["delta"]
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
        yield self.sse("response.output_text.delta", item_id=self.message["id"], output_index=self._index(self.message),
                       content_index=0, delta=piece, logprobs=[])

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
                part = self.builder.text_part(self.text)
                yield self.sse("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                               text=self.text, logprobs=[])
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


routes = [Route("/v1/responses", responses, methods=["POST"])]
