"""Responses API requests -> the chat completion requests they amount to.

`instructions` and `input` (a string, or message, function_call and function_call_output
items) become the chat messages; `max_output_tokens`, `temperature`, `top_p`, `tools`
(function tools), `tool_choice`, `parallel_tool_calls` and `text.format` (text, json_object,
json_schema) their chat counterparts; `include: ["message.output_text.logprobs"]` with
`top_logprobs` the chat logprobs; `reasoning.effort` chat's reasoning_effort. Options that need stored state or something this
server does not run are refused by name (InvalidRequestError -> 400)."""

from __future__ import annotations

import uuid

from loragate.engine.errors import InvalidRequestError

from .reasoning import effort_of

LOGPROBS = "message.output_text.logprobs"  # the one `include` value served
# Extensions passed through to sampling as on the chat endpoint (vLLM's, and OpenAI chat's).
_PASSED_THROUGH = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "speculative")
_REFUSED = {
    "conversation": "conversation objects are not supported: use previous_response_id, or send the earlier items "
                    "again in 'input'",
    "prompt": "stored prompt templates are not supported",
    "background": "background responses are not supported",
    "max_tool_calls": "'max_tool_calls' is not supported",
}


def refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param)


def _text_of(content, where: str) -> str:
    """A message's content: a string, or text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") in ("input_text", "output_text", "text") and isinstance(p.get("text"), str)
               for p in content):
            return "".join(p["text"] for p in content)
        raise refuse(f"{where}: only text content is supported (input_text, output_text)", "input")
    raise refuse(f"{where}.content must be a string or a list of text parts", "input")


_ITEM_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def input_items(body: dict) -> list[dict]:
    """`input` (already validated by input_messages) as Responses items, each with an id and
    a status, text content as parts: what GET /v1/responses/{id}/input_items lists."""
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items:
        item = {"type": "message", **item}
        if item["type"] == "message" and isinstance(item["content"], str):
            part = "output_text" if item["role"] == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        item.setdefault("id", _ITEM_ID_PREFIX[item["type"]] + uuid.uuid4().hex)
        item.setdefault("status", "completed")
        out.append(item)
    return out


def input_messages(body: dict) -> list[dict]:
    """`input` as chat messages (consecutive function_call items are one assistant turn with
    several tool calls, as the chat template expects)."""
    messages: list[dict] = []
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise refuse("'input' must be a non-empty string or list of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise refuse(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise refuse(f"{where} needs a role of user, assistant, system or developer", "input")
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise refuse(f"{where}: a function_call needs string call_id, name and arguments", "input")
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
                raise refuse(f"{where}: a function_call_output needs a string call_id", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(output, where) if not isinstance(output, str) else output})
        elif kind != "reasoning":  # an earlier answer's reasoning, passed back: not shown to the model again
            raise refuse(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                       "function_call_output, reasoning)", "input")
    return messages


def _chat_tools(body: dict) -> tuple[list | None, object]:
    """Responses' flat function tools and tool_choice in chat's nested shape."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise refuse("'tools' must be a list", "tools")
        out = []
        for tool in tools:
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise refuse(f"only function tools are supported, not {kind!r}", "tools")
            out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                                "strict") if k in tool}})
        tools = out or None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise refuse("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
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
        raise refuse("'text' must be an object with an optional 'format' object", "text")
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise refuse(f"text.format type {kind!r} is not supported (text, json_object, json_schema)", "text")


def chat_body_from(body: dict, history: list[dict] = ()) -> dict:
    """The chat completions request a Responses request amounts to: the instructions, then
    `history` (the stored conversation previous_response_id continues), then the input."""
    if not isinstance(body, dict):
        raise refuse("the request body must be a JSON object", "body")
    if not isinstance(body.get("store", True), bool):
        raise refuse("'store' must be a boolean", "store")
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False, 0):
            raise refuse(why, name)
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise refuse("'truncation' must be 'disabled' (a prompt over the context is a 400) or 'auto' (the oldest "
                     "items are dropped until it fits)", "truncation")
    include = body.get("include") or []
    if not isinstance(include, list) or any(item != LOGPROBS for item in include):
        raise refuse(f"'include' may only list {LOGPROBS!r}", "include")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise refuse("'metadata' must be an object of strings", "metadata")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise refuse("'instructions' must be a string", "instructions")
    system = [{"role": "system", "content": instructions}] if instructions is not None else []
    chat = {"model": body.get("model"), "messages": system + list(history) + input_messages(body)}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "stream", *_PASSED_THROUGH):
        if body.get(name) is not None:
            chat[name] = body[name]
    if include:  # the output text's tokens with their logprobs (and top_logprobs alternatives)
        chat["logprobs"] = True
        chat["top_logprobs"] = body.get("top_logprobs") or 0
    elif body.get("top_logprobs"):
        raise refuse(f"'top_logprobs' needs 'include': [{LOGPROBS!r}]", "top_logprobs")
    tools, choice = _chat_tools(body)
    if tools is not None:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (reasoning_config(body) or {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    return chat


def reasoning_config(body: dict) -> dict | None:
    """`reasoning` ({effort, summary}), validated, as the response echoes it. The effort goes
    to the chat template (gateway/reasoning.py with_effort); a reasoning item carries the
    whole reasoning text, so a summary asked for is that text's, with `summary` left empty."""
    reasoning = body.get("reasoning")
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict) or not set(reasoning) <= {"effort", "summary", "generate_summary"}:
        raise refuse("'reasoning' must be an object with 'effort' and 'summary'", "reasoning")
    summary = reasoning.get("summary") or reasoning.get("generate_summary")  # the latter: its deprecated name
    if summary not in (None, "auto", "concise", "detailed"):
        raise refuse("'reasoning.summary' must be 'auto', 'concise' or 'detailed'", "reasoning.summary")
    return {"effort": effort_of(reasoning.get("effort"), "reasoning.effort"), "summary": summary}
