"""The draft model's output head over part of the vocabulary.

Drafting is memory-bound, and a small model's head is a large share of the bytes it reads
per token (Qwen2.5-0.5B: 136M of its 494M parameters). A draft only has to propose likely
tokens, so its head covers the `size` lowest token ids (byte-level BPE vocabularies number
tokens in merge order, roughly most frequent first) plus, per request, the higher ids that
occur in its own text, the rare identifiers it is likely to repeat. This stays lossless: the
target verifies every proposal, and a token outside the subset is simply never proposed.
(FR-Spec, Zhao et al. 2025, restricts the drafter's head to frequent tokens the same way.)
"""

from __future__ import annotations

import torch

from loragate.kernels.dense import dense_linear, pack_weight


class DraftHead:
    def __init__(self, model, size: int, int4: bool = False, vocab: int | None = None):
        """vocab: the target's, which the logits span (-inf past the draft's own rows)."""
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head
        self.weight = head
        self.final_logits = model.final_logits  # Gemma 2's softcap, Granite's divisor
        self.rows = head.shape[0]
        self.vocab = vocab or self.rows
        self.size = self.rows if size <= 0 else min(size, self.rows)
        if self.size == self.rows and not int4:
            self.packed = model.lm_head_packed
        else:
            self.packed = pack_weight(head[: self.size].contiguous(), int4)
        self.extra: dict[str, tuple[list[int], torch.Tensor | None]] = {}  # request id -> (ids, their head rows)

    def add_tokens(self, request_id: str, token_ids: list[int]) -> None:
        """Make the request's own tokens beyond the common subset proposable for it."""
        if self.size == self.rows:
            return
        ids, _ = self.extra.get(request_id, ([], None))
        new = sorted({t for t in token_ids if self.size <= t < self.rows} - set(ids))
        if new:
            ids = ids + new
            self.extra[request_id] = (ids, self.weight[torch.tensor(ids, device=self.weight.device)])

    def forget(self, request_id: str) -> None:
        self.extra.pop(request_id, None)

    def logits(self, hidden: torch.Tensor, request_ids: list[str]) -> torch.Tensor:
        """hidden [n, h] -> fp32 logits [n, vocab] on the host (drafts are drawn there), -inf
        outside each request's subset."""
        sub = self.final_logits(dense_linear(hidden, self.packed, None)).float()
        if self.size == self.vocab:
            return sub.cpu()
        out = torch.full((hidden.shape[0], self.vocab), float("-inf"), device=hidden.device)
        out[:, : self.size] = sub
        for row, rid in enumerate(request_ids):
            ids, rows = self.extra.get(rid, ([], None))
            if ids:
                out[row, torch.tensor(ids, device=hidden.device)] = self.final_logits(hidden[row] @ rows.T).float()
        return out.cpu()
