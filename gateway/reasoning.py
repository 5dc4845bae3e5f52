"""Reasoning models on /v1/chat/completions: the `<think> ... </think>` section of the output
goes to the message's `reasoning` (vLLM's current name) and `reasoning_content` (vLLM's
earlier one, DeepSeek's and SGLang's), the rest to `content`; usage counts its tokens as
`completion_tokens_details.reasoning_tokens`. Where the output starts (inside a section the
prompt opened, or free to open one) is engine/reasoning.py's reasoning_start.

`--reasoning-parser`: auto (on for a model whose vocabulary has both markers and whose chat
template writes them), think (on, or the model fails to load), none. Per request:
`include_reasoning: false` leaves the reasoning out of the answer (vLLM's extension), and
`chat_template_kwargs` reaches the chat template (e.g. Qwen3's `{"enable_thinking": false}`)."""

from __future__ import annotations

from loragate.engine.errors import InvalidRequestError, ModelConfigError
from loragate.engine.reasoning import CLOSED, INSIDE, OPEN, ThinkMarkers, think_markers

# apply_chat_template's own arguments: set by the server, never by chat_template_kwargs
_TEMPLATE_ARGUMENTS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                       "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def reasoning_markers(parser: str, tokenizer) -> ThinkMarkers | None:
    """The markers the server splits chat answers at, per --reasoning-parser (None: no split)."""
    if parser == "none":
        return None
    markers = think_markers(tokenizer)
    if parser == "think" and markers is None:
        raise ModelConfigError("--reasoning-parser think: this model's vocabulary has no <think> and </think> tokens "
                               "that decode to their text (use auto or none)")
    if parser == "auto" and markers is not None and markers.end_text not in (getattr(tokenizer, "chat_template", None)
                                                                          or ""):
        return None  # the tokens exist, but the model was not taught to reason with them
    return markers


def template_kwargs(body: dict) -> dict:
    """vLLM's chat_template_kwargs: extra variables for the chat template."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidRequestError("'chat_template_kwargs' must be an object of template variables",
                                  "chat_template_kwargs")
    taken = sorted(_TEMPLATE_ARGUMENTS & kwargs.keys())
    if taken:
        raise InvalidRequestError(f"'chat_template_kwargs' cannot set {', '.join(taken)}: the server sets it",
                                  "chat_template_kwargs")
    return kwargs


EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's reasoning_effort values


def effort_of(value, param: str) -> str | None:
    """A request's reasoning effort (None: not given), validated."""
    if value is not None and value not in EFFORTS:
        raise InvalidRequestError(f"'{param}' must be one of {', '.join(EFFORTS)}", param)
    return value


def with_effort(kwargs: dict, effort: str | None, template: str | None) -> dict:
    """The chat template's variables with OpenAI's reasoning effort: `reasoning_effort` for
    templates that read it (gpt-oss's; vLLM passes it the same way), and on a template with
    Qwen3's switch, "none" turns thinking off (unless chat_template_kwargs set the switch)."""
    if effort is None:
        return kwargs
    out = {"reasoning_effort": effort, **kwargs}
    if effort == "none" and "enable_thinking" in (template or "") and "enable_thinking" not in kwargs:
        out["enable_thinking"] = False
    return out


def with_reasoning(message: dict, reasoning: str, include: bool) -> dict:
    """An answer's message (or a streamed delta) with its reasoning, under both names; a
    reasoning that took every token leaves the content None, as vLLM does."""
    if not include:
        return message
    if reasoning and message.get("content") == "":
        message = dict(message, content=None)
    return {**message, "reasoning": reasoning or None, "reasoning_content": reasoning or None}


class ReasoningSplit:
    """One choice's output text, as it arrives, split into reasoning and answer. Whitespace
    around the section is dropped, and text that may yet be a marker is held back, so the
    streamed pieces add up to the whole answer's fields."""

    def __init__(self, markers: ThinkMarkers, start: str):
        self.markers = markers
        self.phase = "reasoning" if start == INSIDE else "answer" if start == CLOSED else OPEN
        self.reasoning, self.content = "", ""
        self._pending = ""  # not yet placed: may be (part of) a marker, or whitespace at an edge

    def feed(self, text: str, finished: bool = False) -> tuple[str, str]:
        """Add output text; returns the (reasoning, content) text now placed."""
        self._pending += text
        reasoning, content = "", ""
        if self.phase == OPEN:
            head = self._pending.lstrip()
            if head.startswith(self.markers.start_text):
                self.phase, self._pending = "reasoning", head[len(self.markers.start_text):]
            elif not self.markers.start_text.startswith(head) or finished:
                self.phase = "answer"
            else:
                return "", ""
        if self.phase == "reasoning":
            at = self._pending.find(self.markers.end_text)
            if at >= 0:
                reasoning, self._pending = self._pending[:at], self._pending[at + len(self.markers.end_text):]
                self.phase = "answer"
            else:
                keep = 0 if finished else _held(self._pending, self.markers.end_text)
                cut = len(self._pending) - keep
                reasoning, self._pending = self._pending[:cut], self._pending[cut:]
            reasoning = reasoning if self.reasoning else reasoning.lstrip()
            reasoning = reasoning.rstrip() if self.phase == "answer" or finished else reasoning
            self.reasoning += reasoning
        if self.phase == "answer":
            content = self._pending if self.content else self._pending.lstrip()
            self.content += content
            self._pending = ""
        return reasoning, content


def _held(text: str, marker: str) -> int:
    """Length of the tail of `text` kept back: a marker's beginning, with the whitespace before it."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k + len(text[:-k]) - len(text[:-k].rstrip())
    return len(text) - len(text.rstrip())
