"""Token sampling from logits: greedy, temperature, top-k, top-p, per-request generators.

Semantics: for each row, greedy rows (temperature 0) take argmax; the others sample from
softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all), then to
the smallest set whose probability mass reaches top_p (the token that crosses top_p is kept),
then to the tokens at least min_p times as likely as the most likely one (HF's order),
using that row's own torch.Generator so a seeded request draws the same tokens whatever
else is in the batch. Pure torch (the reference and the CPU path), except greedy argmax, which
has a native kernel on CPU.
"""

from __future__ import annotations

import torch

from . import native as _native


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [n, V] fp32; top_k [n] int64 (0 = off); top_p [n] fp32; min_p [n] fp32 (0 = off).
    Returns logits with filtered-out entries set to -inf (a new tensor)."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    rank = torch.arange(vocab).unsqueeze(0)
    remove = rank >= k.unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Mass strictly before each token: a token is kept while that is below top_p. top_p 1 is
    # off: the fp32 cumsum can reach 1.0 before the tail, which must not drop the tail.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    if min_p is not None:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no renormalisation needed,
        # so applying it after top-k/top-p (which never drop the most likely token) is HF's result.
        remove |= sorted_logits < sorted_logits[:, :1] + min_p.log().unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row (the first maximum on ties), int64 [n]; logits [n, V] in any float
    dtype (bf16 logits need no conversion: it is exact and keeps the order)."""
    if (logits.dim() == 2 and logits.shape[1] > 0 and logits.stride(1) == 1 and logits.device.type == "cpu"
            and logits.dtype in (torch.bfloat16, torch.float32) and _native.library() is not None):
        return _native.argmax_rows(logits)  # one pass over the rows instead of convert + max
    # max().indices is argmax (first maximum on ties) at a third of argmax's cost on CPU.
    return logits.max(dim=-1).indices


_BITS = torch.arange(32, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [..., words] int32 (token i allowed iff bit i % 32 of word i // 32 is set)
    -> bool [..., vocab]."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(*bitmask.shape[:-1], -1)[..., :vocab].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [rows, V] fp32 get -inf at every token their bitmask row [rows, words]
    int32 does not allow (a grammar's mask, the layout llguidance and xgrammar fill)."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1
            and bitmask.is_contiguous() and _native.library() is not None):
        return _native.apply_token_bitmask(logits, bitmask)
    logits.masked_fill_(~bitmask_to_bool(bitmask, logits.shape[1]), float("-inf"))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator], min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [n, V] (fp32, or bf16: rows drawn at random are converted first); temperature,
    top_p, min_p [n] fp32 (min_p None: off everywhere); top_k [n] int64. Returns token ids [n]."""
    tokens = greedy(logits)
    is_random = temperature > 0
    if not bool(is_random.any()):
        return tokens
    rows = is_random.nonzero().squeeze(1)
    scaled = logits[rows].float() / temperature[rows].unsqueeze(1)
    needs_filter = (top_k[rows] > 0) | (top_p[rows] < 1.0)
    if min_p is not None:
        needs_filter |= min_p[rows] > 0
    if bool(needs_filter.any()):
        scaled = filter_logits(scaled, top_k[rows], top_p[rows], None if min_p is None else min_p[rows])
    probs = scaled.softmax(dim=-1)
    for i, row in enumerate(rows.tolist()):
        tokens[row] = torch.multinomial(probs[i], 1, generator=generators[row])[0]
    return tokens


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (before temperature/filtering).

    Returns (chosen [n], top values [n, num_top], top ids [n, num_top])."""
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_vals, top_ids = logp.topk(num_top, dim=-1) if num_top > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, top_vals, top_ids
