"""Speculative decoding acceptance: the standard rejection-sampling rule over one request's
chain of k proposed tokens.

Semantics: `p` [k+1, V] are the target's sampling distributions at the k proposal positions
plus the bonus position (after temperature / top-k / top-p / min-p, as plain sampling would use);
`q` [k, V] are the distributions the proposals were drawn from (None: a deterministic
proposer such as n-gram lookup, i.e. q is one-hot on each proposal). Proposal i is accepted
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection one token is drawn from
the residual max(p_i - q_i, 0) (renormalised) and the chain ends; if all k are accepted a
bonus token is drawn from p_k. The emitted tokens are then distributed exactly as k+1 plain
sampling steps from the target (Leviathan et al. 2023; Chen et al. 2023).

Greedy requests take the exact-match path: accept while d_i == argmax, then emit the argmax,
so the output is token for token what plain greedy decoding produces.

Pure torch: the reference and the CPU path. (On CUDA, flashinfer's chain_speculative_sampling
implements the same rule; this engine runs on CPU, so it is not wired in.)
"""

from __future__ import annotations

import torch

from .sampling import filter_logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   min_p: float = 0.0) -> torch.Tensor:
    """logits [n, V] fp32 -> the distributions plain sampling draws from, [n, V]."""
    scaled = logits / temperature
    if top_k > 0 or top_p < 1.0 or min_p > 0:
        n = logits.shape[0]
        scaled = filter_logits(scaled, torch.full((n,), top_k, dtype=torch.int64),
                               torch.full((n,), top_p, dtype=torch.float32),
                               torch.full((n,), min_p, dtype=torch.float32) if min_p > 0 else None)
    return scaled.softmax(dim=-1)


def accept_greedy(target_argmax: list[int], draft_ids: list[int]) -> list[int]:
    """target_argmax: the target's argmax at the k+1 positions. Returns the emitted tokens:
    the matching prefix of the proposals, then the target's own token."""
    out = []
    for proposed, wanted in zip(draft_ids, target_argmax):
        if proposed != wanted:
            break
        out.append(proposed)
    out.append(target_argmax[len(out)])
    return out


def accept_sampled(p: torch.Tensor, draft_ids: list[int], q: torch.Tensor | None,
                   generator: torch.Generator) -> list[int]:
    """p [k+1, V], q [k, V] or None (one-hot proposals). Returns the emitted tokens."""
    k = len(draft_ids)
    out: list[int] = []
    for i in range(k):
        d = draft_ids[i]
        q_d = float(q[i, d]) if q is not None else 1.0
        p_d = float(p[i, d])
        u = float(torch.rand((), generator=generator))
        if u * q_d < p_d:  # u < p/q without dividing by a q of 0
            out.append(d)
            continue
        if q is not None:
            residual = (p[i] - q[i]).clamp_(min=0)
        else:
            residual = p[i].clone()
            residual[d] = 0
        if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had no mass
            residual = p[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out
