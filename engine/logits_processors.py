"""Per-request logits adjustments before sampling: logit_bias, min_tokens and the presence,
frequency and repetition penalties.

Order, as in vLLM and HF transformers: the bias and min_tokens' ban first, then the
penalties; temperature, top-k and top-p follow in sampling. Presence and frequency penalties
(OpenAI's rule) count the request's output tokens; the repetition penalty (HF's rule: a
positive logit is divided by it, a negative one multiplied) applies to every token of the
prompt and the output. Logprobs stay those of the model's own distribution.

Speculative verification stays lossless: row j of a request verifying k proposals is
adjusted as if the first j proposals were already output, which is what plain decoding would
have seen at that position.
"""

from __future__ import annotations

import torch

from .request import Request
from .sampling_params import SamplingParams


class LogitsAdjuster:
    """One request's adjustments; built once when the request is made."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_token_ids: set[int]):
        self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.int64)
        self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self.min_tokens = params.min_tokens
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.banned_ids = torch.tensor(sorted(banned), dtype=torch.int64)
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.int64).unique() if self.repetition != 1.0 else None

    def apply(self, row: torch.Tensor, output_ids: list[int]) -> None:
        """Adjust one fp32 logits row [V] in place for the token after `output_ids`."""
        if self.bias_ids.numel():
            row.index_add_(0, self.bias_ids, self.bias_values)
        if len(output_ids) < self.min_tokens and self.banned_ids.numel():
            row[self.banned_ids] = float("-inf")
        output = torch.tensor(output_ids, dtype=torch.int64)
        if self.repetition != 1.0:
            seen = torch.cat([self.prompt_ids, output]).unique()
            values = row[seen]
            row[seen] = torch.where(values > 0, values / self.repetition, values * self.repetition)
        if (self.presence or self.frequency) and output.numel():
            ids, counts = output.unique(return_counts=True)
            row[ids] -= self.frequency * counts.float() + self.presence


def adjuster_for(params: SamplingParams, prompt_ids: list[int], eos_token_ids: set[int]) -> LogitsAdjuster | None:
    return LogitsAdjuster(params, prompt_ids, eos_token_ids) if params.adjusts_logits else None


def adjust_logits(reqs: list[Request], num_logits: list[int], logits: torch.Tensor) -> torch.Tensor:
    """logits [sum(num_logits), V] of the requests' sampled rows, request by request. Returns
    them adjusted as fp32 (a new tensor), or `logits` itself when no request adjusts."""
    if all(r.logits_adjuster is None for r in reqs):
        return logits
    out = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    row = 0
    for req, n in zip(reqs, num_logits):
        if req.logits_adjuster is not None:
            for j in range(n):
                req.logits_adjuster.apply(out[row + j], req.output_token_ids + req.spec_token_ids[:j])
        row += n
    return out
