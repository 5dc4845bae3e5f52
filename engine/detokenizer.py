"""Incremental detokenization with stop strings.

Decoding a token alone can split a multi-byte character or drop a leading space, so each
step decodes a short window of recent tokens and emits only the text that has become stable.
Text that could still be the start of a stop string is held back from streaming.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params):
        self.tokenizer = tokenizer
        self.stop = params.stop
        self.min_tokens = params.min_tokens  # stop strings in the text of the first min_tokens tokens do not count
        self.keep_stop = params.include_stop_str_in_output  # the text ends with the stop string that ended it
        self.skip_special = params.skip_special_tokens
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_emitted_chars = 0
        self.matched_stop: str | None = None

    def add_tokens(self, new_ids: list[int]) -> None:
        """Append tokens; sets `matched_stop` (and truncates `text`) when a stop string appears."""
        for token in new_ids:
            self.token_ids.append(token)
            prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset],
                                           skip_special_tokens=self.skip_special)
            full = self.tokenizer.decode(self.token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new_text = full[len(prefix):]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
                if self._append(new_text):
                    return

    def _append(self, new_text: str) -> bool:
        start = max(0, len(self.text) - self.holdback)
        self.text += new_text
        if len(self.token_ids) <= self.min_tokens:
            return False
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:
                self.text = self.text[:at + (len(s) if self.keep_stop else 0)]
                self.matched_stop = s
                return True
        return False

    def take_delta(self, finished: bool) -> str:
        """New text since the last call, keeping back a possible stop-string prefix."""
        end = len(self.text) if finished or not self.stop else max(self.num_emitted_chars, len(self.text) - self.holdback)
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta
