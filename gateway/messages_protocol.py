"""Anthropic Messages API requests -> the chat completion requests they amount to.

`system` (a string or text blocks) becomes the system message; `messages` the chat messages,
their content a string or blocks: text, tool_use (an assistant's earlier call) and tool_result
(its answer, a tool message); thinking blocks of earlier answers are dropped, as chat templates
drop earlier reasoning. `max_tokens` (required), `stop_sequences`, `temperature`, `top_p`,
`top_k`, `tools` (custom tools: name, description, input_schema), `tool_choice` (auto, any,
tool, none; disable_parallel_tool_use) map onto their chat counterparts, and
`output_config.format` (a JSON schema) onto response_format: the answer is constrained to it.
`metadata`, `service_tier`, `speed`, `output_config.effort` and `cache_control` marks are
accepted and change nothing (the prefix cache is automatic); `thinking` is validated here
(gateway/messages_api.py turns it into Qwen3's enable_thinking where a template has it), and
a reasoning model's thinking comes back as thinking blocks. Images,
documents, server tools, containers and MCP servers are a 400 naming them
(InvalidRequestError -> 400)."""

from __future__ import annotations

import json

from loragate.engine.errors import InvalidRequestError

_REFUSED = {
    "mcp_servers": "MCP servers are not supported",
    "container": "containers (code execution) are not supported",
    "context_management": "context management is not supported",
}


refuse = InvalidRequestError  # (message, param): a 400 naming what cannot be served


def _texts(blocks, where: str) -> str:
    """A string, or text blocks joined (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if isinstance(blocks, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                        and isinstance(b.get("text"), str) for b in blocks):
        return "".join(b["text"] for b in blocks)
    raise refuse(f"{where} must be a string or a list of text blocks", where.split("[")[0].split(".")[0])


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise refuse(f"{where}.content must be a string or a list of content blocks", "messages")
    return content


def _message(m, i: int) -> list[dict]:
    """One Anthropic message as chat messages: a user turn's tool results come first, as tool
    messages, then its text; an assistant turn's tool_use blocks become its tool_calls."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise refuse(f"{where} needs a role of user or assistant", "messages")
    text, calls, results = [], [], []
    for j, block in enumerate(_blocks(m.get("content"), where)):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and m["role"] == "assistant":
            if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                    and isinstance(block.get("input", {}), dict)):
                raise refuse(f"{where}.content[{j}]: a tool_use block needs a string id and name and an object "
                             "input", "messages")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and m["role"] == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise refuse(f"{where}.content[{j}]: a tool_result block needs its tool_use_id", "messages")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _texts(block.get("content", ""), f"{where}.content[{j}].content")})
        elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
            continue  # an earlier answer's reasoning: templates leave it out
        else:
            raise refuse(f"{where}.content[{j}]: {kind!r} blocks are not supported in {m['role']} messages "
                         "(text, tool_use from the assistant, tool_result from the user)", "messages")
    out = results
    if calls:
        out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
    elif text or not results:
        out.append({"role": m["role"], "content": "".join(text)})
    return out


def _tools(body: dict) -> dict:
    tools = body.get("tools")
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise refuse("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" or not isinstance(tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise refuse(f"tools[{i}]: only custom tools (name, description, input_schema) are supported"
                         + (f", not {kind!r}" if kind else ""), "tools")
        function = {"name": tool["name"], "parameters": tool.get("input_schema", {"type": "object"})}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    chat = {"tools": out}
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
            raise refuse("'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", "
                         "\"name\": ...}", "tool_choice")
        chat["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}} if kind == "tool"
                               else {"any": "required"}.get(kind, kind))
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _thinking(body: dict) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive",
                                                                      "between_tools"):
        raise refuse("'thinking' must be {\"type\": \"enabled\" | \"disabled\" | \"adaptive\" | \"between_tools\"}",
                     "thinking")


def _output_format(body: dict) -> dict:
    """output_config.format as the chat's response_format."""
    config = body.get("output_config")
    if config is None:
        return {}
    form = config.get("format") if isinstance(config, dict) else None
    if not isinstance(config, dict) or form is not None and not (
            isinstance(form, dict) and form.get("type") == "json_schema" and isinstance(form.get("schema"), dict)):
        raise refuse("'output_config' must be an object; its 'format' {\"type\": \"json_schema\", \"schema\": {...}}",
                     "output_config")
    return {} if form is None else {"response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "output", "schema": form["schema"]}}}


def chat_body_from(body) -> dict:
    """The chat completion body a Messages request amounts to (InvalidRequestError names
    what cannot be served)."""
    if not isinstance(body, dict):
        raise refuse("the request body must be a JSON object", "body")
    for name, why in _REFUSED.items():
        if body.get(name):
            raise refuse(why, name)
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise refuse("'max_tokens' is required: a positive integer", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise refuse("'messages' must be a non-empty list", "messages")
    chat_messages = [m for i, message in enumerate(messages) for m in _message(message, i)]
    if body.get("system") is not None:
        chat_messages.insert(0, {"role": "system", "content": _texts(body["system"], "system")})
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise refuse("'stop_sequences' must be a list of non-empty strings", "stop_sequences")
    _thinking(body)
    chat = {"model": body.get("model"), "messages": chat_messages, "max_tokens": max_tokens,
            "stream": body.get("stream", False), **_tools(body), **_output_format(body)}
    if stop:
        chat["stop"] = stop
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat
