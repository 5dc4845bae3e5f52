"""N-gram prompt lookup: propose what followed the latest earlier occurrence of the request's
last n tokens in its own prompt + output. No model, so proposing costs almost nothing;
strong wherever the output copies its input (code edits, RAG answers, summaries)."""

from __future__ import annotations

from array import array

import torch

from ..request import Request
from .proposer import Proposal

_ITEM = array("i").itemsize


class NgramProposer:
    cost_per_token = 0.001  # a lookup in the request's own tokens: no model
    wants_hidden_states = False

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min <= max, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[Request], num_tokens: list[int],
                hidden_states: dict[str, torch.Tensor] | None = None) -> list[Proposal]:
        return [Proposal(self.lookup(req.all_token_ids, k)) for req, k in zip(requests, num_tokens)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The k tokens after the latest earlier match of the longest suffix n-gram (max_n
        down to min_n) of `tokens`; [] when none matches."""
        if k <= 0 or len(tokens) <= self.min_n:
            return []
        data = array("i", tokens).tobytes()
        n_total = len(tokens)
        for n in range(min(self.max_n, n_total - 1), self.min_n - 1, -1):
            pattern = data[(n_total - n) * _ITEM:]
            # Search everything before the suffix itself; bytes.rfind is C-speed but may hit
            # a position inside a token, so step back until the match is token-aligned.
            end = (n_total - 1) * _ITEM
            while (at := data.rfind(pattern, 0, end)) != -1:
                if at % _ITEM == 0:
                    start = at // _ITEM + n
                    return tokens[start:start + k]
                end = at + len(pattern) - 1
        return []

    def forget(self, keep: set[str]) -> None:
        pass  # stateless
