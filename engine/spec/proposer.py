"""The Proposer interface every speculative token source implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..request import Request


@dataclass
class Proposal:
    token_ids: list[int]  # may be shorter than asked (or empty: nothing worth proposing)
    # The distributions the tokens were drawn from, [len(token_ids), vocab] fp32; None when
    # they were chosen deterministically (greedy drafting, n-gram lookup): the acceptance rule
    # then treats each as a one-hot q.
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    # Cost of one proposing round (a draft forward) in target decode steps: the controller's
    # estimate until it has measured the real one.
    cost_per_token: float
    # A proposer that drafts from the target's own features (a parallel block drafter in
    # the DFlash style) sets this; the runner then hands it the target's final hidden states
    # at each request's sampled positions.
    wants_hidden_states: bool

    def propose(self, requests: list[Request], num_tokens: list[int],
                hidden_states: dict[str, torch.Tensor] | None = None) -> list[Proposal]:
        """Up to num_tokens[i] tokens to follow requests[i]'s current tokens."""
        ...

    def forget(self, keep: set[str]) -> None:
        """Drop per-request state (draft KV cache, ...) of every request id not in `keep`."""
        ...
