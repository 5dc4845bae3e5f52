"""The Responses API's objects: the response object with its output items (message,
function_call), the chat assistant message a response's output was generated as, and the
Responses event stream made from chat completion chunks (SSE with `event:` lines, numbered
by sequence_number)."""

from __future__ import annotations

import json
import time
import uuid

from .responses_protocol import reasoning_config


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
    def reasoning_item(text: str, status: str = "completed") -> dict:
        """A reasoning model's section before its answer (gateway/reasoning.py), as gpt-oss's."""
        return {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    @staticmethod
    def text_part(text: str, logprobs: list | None = None) -> dict:
        """logprobs: chat's per-token entries (token, logprob, bytes, top_logprobs), the same shape."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    @staticmethod
    def call_item(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def response(self, status: str, finish_reason: str | None = None, usage: dict | None = None,
                 metrics: dict | None = None) -> dict:
        """metrics: {"metrics": ...} of the chat answer it was made from, or {}."""
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
            "previous_response_id": body.get("previous_response_id"), "reasoning": reasoning_config(body),
            "store": self.stored, "background": False, "service_tier": "default", "user": body.get("user"),
            "usage": _usage(usage) if usage is not None else None, **(metrics or {}),
        }


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": chat_usage["prompt_tokens_details"],
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": (chat_usage.get("completion_tokens_details") or {})
                                      .get("reasoning_tokens", 0)},
            "total_tokens": chat_usage["total_tokens"]}


def answer_message(output: list[dict]) -> dict:
    """A response's output items as the chat assistant message they were generated as."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    return {"role": "assistant", "content": text or None, "tool_calls": calls} if calls else \
        {"role": "assistant", "content": text}


class StreamedResponse:
    """Chat completion chunks -> the Responses stream's events (SSE with `event:` lines)."""

    def __init__(self, builder: ResponseBuilder):
        self.builder = builder
        self.sequence = 0
        self.message: dict | None = None  # the message item, once text streams
        self.reasoning: dict | None = None  # the reasoning item, once a reasoning model's section streams
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
            self.final = self.builder.response("completed", self.finish_reason, chunk["usage"],
                                               {k: v for k, v in chunk.items() if k == "metrics"})
            return
        choice = chunk["choices"][0]
        delta = choice["delta"]
        entries = (choice.get("logprobs") or {}).get("content") or []
        self.logprobs += entries
        self.unsent += len(entries)
        if delta.get("reasoning"):
            yield from self._reasoning(delta["reasoning"])
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

    def _reasoning(self, piece: str):
        if self.reasoning is None:
            self.reasoning = self.builder.reasoning_item("", status="in_progress")
            self.builder.output.append(self.reasoning)
            yield self.sse("response.output_item.added", output_index=self._index(self.reasoning), item=self.reasoning)
        self.reasoning["content"][0]["text"] += piece
        yield self.sse("response.reasoning_text.delta", item_id=self.reasoning["id"],
                       output_index=self._index(self.reasoning), content_index=0, delta=piece)

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
        if self.message is None and not self.calls:  # no answer was generated: still one (empty) message
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
            elif item["type"] == "reasoning":
                yield self.sse("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                               text=item["content"][0]["text"])
                item["status"] = "completed"
            else:
                yield self.sse("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"])
                item["status"] = "completed"
            yield self.sse("response.output_item.done", output_index=index, item=item)

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.builder.output) if it is item)
