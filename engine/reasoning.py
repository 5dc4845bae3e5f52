"""Reasoning ("thinking") models: Qwen3, QwQ, DeepSeek-R1 and its distills, SmolLM3 and
others write `<think> ... </think>` before their answer.

Where the output starts follows from the prompt's end, whatever the chat template:
- INSIDE: the prompt ends in an open `<think>` (DeepSeek-R1's and Qwen3-Thinking's
  templates put it there), so the output is reasoning until `</think>`;
- CLOSED: the prompt ends right after `</think>` (Qwen3 with `enable_thinking: false`
  inserts an empty section), so the output is all answer;
- OPEN: otherwise; the output is reasoning only if it opens with `<think>` (Qwen3's default).

A structured output format (a JSON schema, a forced tool call) applies to the answer only:
GrammarAfterReasoning leaves the reasoning free and hands the tokens after `</think>` to the
format's grammar, as vLLM does with a reasoning parser on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loragate.kernels.sampling import apply_token_bitmask

INSIDE, OPEN, CLOSED = "inside", "open", "closed"
REASONING, ANSWER = "reasoning", "answer"  # the phases after OPEN


@dataclass(frozen=True)
class ThinkMarkers:
    start: int  # token ids
    end: int
    start_text: str = "<think>"
    end_text: str = "</think>"


def think_markers(tokenizer) -> ThinkMarkers | None:
    """The model's `<think>` and `</think>`, where each is one token of its vocabulary that
    decodes to its own text (a marker dropped from decoded text as a special token could not be
    found in the output)."""
    ids = []
    for text in (ThinkMarkers.start_text, ThinkMarkers.end_text):
        token = tokenizer.convert_tokens_to_ids(text)
        if not isinstance(token, int) or token == tokenizer.unk_token_id or \
                tokenizer.decode([token], skip_special_tokens=True) != text:
            return None
        ids.append(token)
    return ThinkMarkers(*ids)


def reasoning_start(prompt_ids: list[int], markers: ThinkMarkers, tokenizer) -> str:
    """INSIDE, OPEN or CLOSED: where the output of this prompt starts (see the module's note).
    Only whitespace may follow the marker that decides it: an earlier turn's section in the
    history does not."""
    for i in range(len(prompt_ids) - 1, max(-1, len(prompt_ids) - 9), -1):
        if prompt_ids[i] in (markers.start, markers.end):
            if tokenizer.decode(prompt_ids[i + 1:], skip_special_tokens=True).strip():
                return OPEN
            return INSIDE if prompt_ids[i] == markers.start else CLOSED
    return OPEN


def next_phase(phase: str, token: int, markers: ThinkMarkers) -> str:
    """The phase after emitting `token` (INSIDE is REASONING; OPEN lasts one token)."""
    if phase == OPEN:
        return REASONING if token == markers.start else ANSWER
    if phase in (INSIDE, REASONING):
        return ANSWER if token == markers.end else REASONING
    return ANSWER


def reasoning_token_count(tokens: list[int], start: str, markers: ThinkMarkers) -> int:
    """How many of the output's tokens are its reasoning section, the markers included."""
    phase, count = start, 0
    for token in tokens:
        if phase in (CLOSED, ANSWER) or (phase == OPEN and token != markers.start):
            break
        count += 1
        phase = next_phase(phase, token, markers)
    return count


class GrammarAfterReasoning:
    """A GrammarConstraint (engine/structured_output.py) that holds back until the reasoning is
    over: free tokens while reasoning; at an OPEN start, what the grammar allows or `<think>`;
    after `</think>` (or a first token other than `<think>`), the grammar's. The engine calls
    it as it calls the constraint it wraps."""

    def __init__(self, inner, markers: ThinkMarkers, start: str):
        self.inner, self.markers = inner, markers
        self.phase = REASONING if start == INSIDE else start  # OPEN or REASONING (CLOSED is never wrapped)
        self._draft_phase = self.phase  # the phase after the drafted tokens
        self.vocab_size, self.words = inner.vocab_size, inner.words

    def _row(self, phase: str) -> torch.Tensor:
        """[words] int32: the mask of a row in a phase before the answer."""
        if phase == REASONING:
            return torch.full((self.words,), -1, dtype=torch.int32)
        row = self.inner.bitmasks([])[0]
        word = (int(row[self.markers.start >> 5]) | 1 << (self.markers.start & 31)) & 0xFFFFFFFF
        row[self.markers.start >> 5] = word - (1 << 32) if word >= 1 << 31 else word
        return row

    def _answer_from(self, proposals: list[int]) -> tuple[list[torch.Tensor], int | None, int]:
        """Rows before the answer, the position where the grammar's tokens start among the
        proposals (None: not reached), and how many of those rows' tokens the phase consumed."""
        rows, phase = [], self.phase
        for j, token in enumerate(proposals):
            rows.append(self._row(phase))
            before, phase = phase, next_phase(phase, token, self.markers)
            if phase == ANSWER:
                return rows, (j if before == OPEN else j + 1), j + 1
        rows.append(self._row(phase))
        return rows, None, len(proposals)

    def bitmasks(self, proposals: list[int]) -> torch.Tensor:
        if self.phase == ANSWER:
            return self.inner.bitmasks(proposals)
        rows, at, taken = self._answer_from(proposals)
        if at is None:
            return torch.stack(rows)
        answer = self.inner.bitmasks(proposals[at:])
        return torch.cat([torch.stack(rows), answer[taken - at:]])

    def valid_prefix(self, proposals: list[int]) -> int:
        if self.phase == ANSWER:
            return self.inner.valid_prefix(proposals)
        _, at, taken = self._answer_from(proposals)
        return len(proposals) if at is None else at + self.inner.valid_prefix(proposals[at:])

    def forced_tokens(self, limit: int) -> list[int]:
        return self.inner.forced_tokens(limit) if self.phase == ANSWER else []

    def advance(self, token: int) -> bool:
        if self.phase != ANSWER:
            before, self.phase = self.phase, next_phase(self.phase, token, self.markers)
            self._draft_phase = self.phase  # drafting starts from the emitted tokens
            if not (before == OPEN and self.phase == ANSWER):
                return False
        return self.inner.advance(token)

    # -- drafting: the same phases over the drafted tokens, undone with them ------------------

    def mask_draft_logits(self, logits: torch.Tensor) -> bool:
        if self._draft_phase == ANSWER:
            return self.inner.mask_draft_logits(logits)
        if self._draft_phase == OPEN:
            apply_token_bitmask(logits.unsqueeze(0), self._row(OPEN).unsqueeze(0))
            return bool(logits.isfinite().any())
        return True

    def draft(self, token: int) -> bool:
        if self._draft_phase == ANSWER:
            return self.inner.draft(token)
        if token in self.inner.eos_token_ids:
            return False
        before, self._draft_phase = self._draft_phase, next_phase(self._draft_phase, token, self.markers)
        return self.inner.draft(token) if before == OPEN and self._draft_phase == ANSWER else True

    def undo_drafts(self) -> None:
        self.inner.undo_drafts()
        self._draft_phase = self.phase
