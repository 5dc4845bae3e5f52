"""OpenAI function calling on /v1/chat/completions: `tools` and `tool_choice` in, assistant
messages with `tool_calls` out.

- A named function (`{"type": "function", "function": {"name": ...}}`) or `"required"`:
  the output is constrained to the call's JSON (the function's parameters schema; for
  required, a list of calls to any of the tools), so it always parses. Works with any model.
- `"auto"` (the default when tools are given): the model decides, so it must know how to
  call them: its chat template has to show it the tools with a call format, and the calls are
  parsed out of its text afterwards. Formats: Hermes (Qwen2.5, Qwen3, SmolLM3 and others:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), and JSON calls at the start
  of the answer: Llama 3.x's (`<|python_tag|>{"name": ..., "parameters": {...}}`, several
  separated by `;`), Mistral's (`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`), and
  Granite's and Phi-4-mini's (`<|tool_call|>[...]`). Their markers are special tokens,
  usually dropped from the text: the JSON is what is read.
- `"none"`: the tools are not shown to the model.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from loragate.engine.errors import InvalidRequestError
from loragate.engine.structured_output import grammar_from_json_schema

TAG = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_DECODER = json.JSONDecoder()
# What opens JSON calls at an answer's start where the decoder keeps special tokens (Llama 3.x,
# Mistral, Granite / Phi-4-mini); and what in a chat template shows a model can call tools.
CALL_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]", "<|tool_call|>")
_TEMPLATE_FORMATS = (TAG, *CALL_MARKERS, '"parameters"')


def _bad(message: str, param: str = "tools") -> InvalidRequestError:
    return InvalidRequestError(message, param)


@dataclass
class ToolPlan:
    tools: list[dict]  # OpenAI's tool objects, as the chat template receives them
    mode: str  # "auto" | "required" | "named" | "none"
    name: str | None = None  # the named function
    parallel: bool = True  # parallel_tool_calls: false allows one call per answer

    @property
    def shown(self) -> list[dict] | None:
        """The tools the chat template gets (None: none)."""
        return None if self.mode == "none" else self.tools

    def _parameters(self, name: str) -> dict:
        """The function's parameters schema, closed to arguments it does not name unless it
        says otherwise: JSON Schema allows any by default, and small models invent some."""
        tool = next(t for t in self.tools if t["function"]["name"] == name)
        schema = tool["function"].get("parameters") or {"type": "object"}
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema = dict(schema, additionalProperties=False)
        return schema

    def grammar(self) -> str | None:
        """The grammar the output must follow: the named call's arguments, or a list of calls."""
        if self.mode == "named":
            return grammar_from_json_schema(self._parameters(self.name))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                        "arguments": self._parameters(t["function"]["name"])},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
            return grammar_from_json_schema({"type": "array", "minItems": 1, "items": {"anyOf": calls},
                                             **({} if self.parallel else {"maxItems": 1})})
        return None

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message for a choice's text, and its finish_reason."""
        try:
            calls, rest = self._calls(text)
        except RecursionError:  # JSON nested past the parser's limit: the model's text, not calls
            calls, rest = None, ""
        if not calls or finish_reason != "stop":  # cut short, or no call: the text as it is
            return {"role": "assistant", "content": text}, finish_reason
        tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": name, "arguments": arguments}} for name, arguments in calls]
        content = rest or None  # auto: the text around the calls
        return ({"role": "assistant", "content": content, "tool_calls": tool_calls},
                "stop" if self.mode == "named" else "tool_calls")

    def _calls(self, text: str) -> tuple[list[tuple[str, str]] | None, str]:
        """The (name, arguments) calls in the text, and the text around them (auto)."""
        if self.mode == "named":
            return ([(self.name, text)] if _is_json_object(text) else None), ""
        if self.mode == "required":
            parsed = _loads(text)
            if isinstance(parsed, list) and all(isinstance(c, dict) and {"name", "arguments"} <= c.keys() for c in parsed):
                return [(c["name"], json.dumps(c["arguments"])) for c in parsed], ""
            return None, ""
        if self.mode == "auto":
            calls, rest = self._hermes_calls(text)
            return (calls[:1] if calls and not self.parallel else calls), rest
        return None, ""

    def _hermes_calls(self, text: str) -> tuple[list[tuple[str, str]] | None, str]:
        """Calls in <tool_call> blocks, or (small models drop the tags) the call JSON objects a
        text starts with; the text left around them."""
        blocks = _HERMES_CALL.findall(text)
        if not blocks:
            return self._bare_calls(text)
        calls = []
        for block in blocks:
            call = _loads(block)
            if not self._is_call(call):
                return None, text  # not a call this request can answer: leave the text alone
            calls.append((call["name"], json.dumps(_arguments(call))))
        return calls, _HERMES_CALL.sub("", text).strip()

    def _bare_calls(self, text: str) -> tuple[list[tuple[str, str]] | None, str]:
        """Untagged calls: at the start of the text (after a call marker, if kept), JSON call
        objects or lists of them, one after another (separated by space, ';' or ','), each
        naming a tool with object arguments; the rest of the text stays content."""
        calls, rest = [], _after_marker(text.lstrip())
        while rest.startswith(("{", "[")):
            try:
                value, end = _DECODER.raw_decode(rest)
            except json.JSONDecodeError:
                break
            found = value if isinstance(value, list) else [value]
            if not found or not all(self._is_call(call) for call in found):
                break
            calls += [(call["name"], json.dumps(_arguments(call))) for call in found]
            rest = _after_marker(rest[end:].lstrip().lstrip(";,").lstrip().removeprefix("<|/tool_call|>").lstrip())
        return (calls, rest.strip()) if calls else (None, text)

    def _is_call(self, obj) -> bool:
        return (isinstance(obj, dict) and isinstance(_arguments(obj), dict)
                and obj.get("name") in {t["function"]["name"] for t in self.tools})


def _arguments(call: dict):
    """A call's arguments: "arguments", or Llama 3.x's "parameters"."""
    return call.get("arguments", call.get("parameters"))


def _after_marker(text: str) -> str:
    for marker in CALL_MARKERS:
        if text.startswith(marker):
            return text[len(marker):].lstrip()
    return text


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _is_json_object(text: str) -> bool:
    return isinstance(_loads(text), dict)


def parse_tool_plan(body: dict) -> ToolPlan | None:
    """The request's tools and tool_choice, validated; None when it has no tools."""
    if body.get("functions") or body.get("function_call"):
        raise _bad("'functions' and 'function_call' are deprecated; use 'tools' and 'tool_choice'", "functions")
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"]):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise _bad("tool names must be unique")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None or choice in ("auto", "none", "required"):
        return ToolPlan(tools, choice or "auto", parallel=parallel)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and name in names):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or "
                   "{\"type\": \"function\", \"function\": {\"name\": <one of the tools>}}", "tool_choice")
    return ToolPlan(tools, "named", name, parallel)


def check_template(plan: ToolPlan, chat_template: str | None) -> None:
    """'auto' needs a template that shows the model the tools and a call format."""
    if plan.mode == "auto" and not (chat_template and "tools" in chat_template
                                    and any(f in chat_template for f in _TEMPLATE_FORMATS)):
        raise _bad("tool_choice 'auto' needs a model whose chat template describes tools with a call format "
                   "(Hermes <tool_call>, as Qwen2.5's; Llama 3.x's, Mistral's, Granite's JSON calls); this one does "
                   "not. Use tool_choice 'required' or a named function: those constrain the output to a call and "
                   "work with any model", "tool_choice")


def template_message(message: dict, content: str) -> dict:
    """An assistant message's tool_calls as chat templates read them: arguments as an object."""
    if not isinstance(message["tool_calls"], list):
        raise _bad("an assistant message's tool_calls must be a list", "messages")
    calls = []
    for call in message["tool_calls"]:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("tool_calls entries need function.name and function.arguments", "messages")
        arguments = _loads(fn.get("arguments")) if isinstance(fn.get("arguments"), str) else fn.get("arguments")
        if not isinstance(arguments, dict):
            raise _bad("tool_calls[].function.arguments must be a JSON object (as a string)", "messages")
        calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return {"role": "assistant", "content": content, "tool_calls": calls}


class StreamedCalls:
    """One streamed choice's deltas under a tool plan.

    - auto: text streams as content as it comes, except what could begin a `<tool_call>`
      tag, and from a tag on (or from a leading `{` or `[` or call marker: JSON calls) nothing: the calls are
      told apart at the end, where the rest of the content and the calls follow.
    - named: the output is the call's arguments, so they stream as its `arguments` pieces.
    - required: a list of calls, sent whole at the end.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.sent = 0  # characters of the text sent as content (auto) or arguments (named)
        self.holding = False
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, text: str) -> dict | None:
        """What to send now that the choice's text is `text` (None: nothing yet)."""
        if self.plan.mode == "named":
            piece = text[self.sent:]
            if not piece:
                return None
            call = {"index": 0, "function": {"arguments": piece}}
            if self.sent == 0:
                call = {"index": 0, "id": self.call_id, "type": "function",
                        "function": {"name": self.plan.name, "arguments": piece}}
            self.sent = len(text)
            return {"tool_calls": [call]}
        if self.plan.mode != "auto" or self.holding:
            return None
        if self.sent == 0 and not text.strip():
            return None  # leading whitespace: a bare call may still follow
        head = text.lstrip()
        if self.sent == 0 and (head.startswith(("{", "[")) or any(m.startswith(head[:len(m)]) for m in CALL_MARKERS)):
            self.holding = True  # perhaps a bare call, or a call marker
            return None
        at = text.find(TAG)
        if at >= 0:
            self.holding = True
        else:  # hold back a tail that may grow into the tag
            at = next((len(text) - k for k in range(min(len(TAG) - 1, len(text)), 0, -1) if TAG.startswith(text[-k:])),
                      len(text))
        piece, self.sent = text[self.sent:at], max(self.sent, at)
        return {"content": piece} if piece else None

    def final(self, text: str, finish_reason: str) -> tuple[dict | None, str]:
        """The last delta once the text is complete, and the choice's finish_reason."""
        if self.plan.mode == "named":
            return self.delta(text), finish_reason
        message, reason = self.plan.message(text, finish_reason)
        if "tool_calls" not in message:
            rest = text[self.sent:]
            return ({"content": rest} if rest else None), reason
        delta = {"tool_calls": [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]}
        # auto: the text around the calls not sent yet (after untagged calls, none was sent)
        rest = (_HERMES_CALL.sub("", text)[self.sent:].strip() if self.sent else message["content"]) \
            if message["content"] else ""
        if rest:
            delta["content"] = rest
        return delta, reason
