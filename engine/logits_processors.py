"""Per-request logits adjustments before sampling: logit_bias, allowed_token_ids, bad_words,
min_tokens, the presence, frequency and repetition penalties, and a structured output's
grammar mask.

Order, as in vLLM and HF transformers: the bias, the allowed set, the bad words' and
min_tokens' bans first, then the penalties; temperature, top-k and top-p follow in sampling. Presence and frequency penalties
(OpenAI's rule) count the request's output tokens; the repetition penalty (HF's rule: a
positive logit is divided by it, a negative one multiplied) applies to every token of the
prompt and the output. Logprobs stay those of the model's own distribution.

Speculative verification stays lossless: row j of a request verifying k proposals is
adjusted as if the first j proposals were already output, which is what plain decoding would
have seen at that position.
"""

from __future__ import annotations

import torch

from loragate.kernels.sampling import apply_token_bitmask

from .request import Request
from .sampling_params import SamplingParams


class LogitsAdjuster:
    """One request's adjustments; built when the request is made and told each token it emits,
    so a step costs the same however long the prompt and output are."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_token_ids: set[int], tokenizer=None):
        self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.int64)
        allowed = params.allowed_token_ids
        self.allowed_ids = torch.tensor(sorted(set(allowed)), dtype=torch.int64) if allowed is not None else None
        words = bad_words_token_ids(params.bad_words, tokenizer) if params.bad_words else []
        self.bad_ids = torch.tensor(sorted({w[0] for w in words if len(w) == 1}), dtype=torch.int64)
        self.bad_sequences = [w for w in words if len(w) > 1]  # banned: the last token after the others
        self.history = list(prompt_ids) if self.bad_sequences else None  # prompt and output tokens
        self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self.min_tokens = params.min_tokens
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.banned_ids = torch.tensor(sorted(banned), dtype=torch.int64)
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.counts: dict[int, int] = {}  # output token -> times emitted
        self.seen = set(prompt_ids)  # prompt and output tokens (the repetition penalty's set)
        self._seen_ids: torch.Tensor | None = None  # `seen` as a tensor, rebuilt when it grows

    def advance(self, token: int) -> None:
        """Record an emitted token."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.history is not None:
            self.history.append(token)
        if token not in self.seen:
            self.seen.add(token)
            self._seen_ids = None

    def apply(self, row: torch.Tensor, num_output: int, proposals: list[int]) -> None:
        """Adjust one fp32 logits row [V] in place for the token after the `num_output` output
        tokens so far and then `proposals` (the speculative tokens before this row's position)."""
        if self.bias_ids.numel():
            row.index_add_(0, self.bias_ids, self.bias_values)
        if self.allowed_ids is not None:
            kept = row[self.allowed_ids]
            row.fill_(float("-inf"))
            row[self.allowed_ids] = kept
        if self.bad_ids.numel():
            row[self.bad_ids] = float("-inf")
        for word in self.bad_sequences:
            k = len(word) - 1
            if (self.history[-k:] + proposals)[-k:] == word[:-1]:
                row[word[-1]] = float("-inf")
        if num_output + len(proposals) < self.min_tokens and self.banned_ids.numel():
            row[self.banned_ids] = float("-inf")
        if self.repetition != 1.0:
            if self._seen_ids is None:
                self._seen_ids = torch.tensor(sorted(self.seen), dtype=torch.int64)
            seen = self._seen_ids
            new = [t for t in set(proposals) if t not in self.seen]
            if new:
                seen = torch.cat([seen, torch.tensor(new, dtype=torch.int64)])
            values = row[seen]
            row[seen] = torch.where(values > 0, values / self.repetition, values * self.repetition)
        if self.presence or self.frequency:
            counts = self.counts
            if proposals:
                counts = dict(counts)
                for t in proposals:
                    counts[t] = counts.get(t, 0) + 1
            if counts:
                ids = torch.tensor(list(counts), dtype=torch.int64)
                row[ids] -= self.frequency * torch.tensor(list(counts.values()), dtype=torch.float32) + self.presence


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Each word's tokens as written and, where that differs, after a space (vLLM's rule)."""
    out = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out += [ids for ids in (alone, spaced) if ids and ids not in out]
    return out


def adjuster_for(params: SamplingParams, prompt_ids: list[int], eos_token_ids: set[int],
                 tokenizer=None) -> LogitsAdjuster | None:
    return LogitsAdjuster(params, prompt_ids, eos_token_ids, tokenizer) if params.adjusts_logits else None


def adjust_logits(reqs: list[Request], num_logits: list[int], logits: torch.Tensor) -> torch.Tensor:
    """logits [sum(num_logits), V] of the requests' sampled rows, request by request. Returns
    them adjusted as fp32 (a new tensor), or `logits` itself when no request adjusts."""
    if all(r.logits_adjuster is None and r.grammar is None for r in reqs):
        return logits
    out = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    row = 0
    for req, n in zip(reqs, num_logits):
        if req.logits_adjuster is not None:
            for j in range(n):
                req.logits_adjuster.apply(out[row + j], len(req.output_token_ids), req.spec_token_ids[:j])
        if req.grammar is not None:  # last: whatever the adjustments favour, the grammar decides
            apply_token_bitmask(out[row:row + n], req.grammar.bitmasks(req.spec_token_ids[:n - 1]))
        row += n
    return out
