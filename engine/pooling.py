"""Embeddings: the prompt's final hidden states (after the final norm, what transformers
calls last_hidden_state) pooled into one vector per request (SamplingParams.pooling).

- "last": the last prompt token's state, as decoder embedding models are trained
  (Qwen3-Embedding, E5-Mistral, gte-Qwen2).
- "first": the first prompt token's state (vLLM's and sentence-transformers' CLS pooling).
- "mean" / "max": the mean, or the element-wise maximum, over every prompt token
  (sentence-transformers' mean_tokens and max_tokens).

Every pooling but "last" needs states of positions a prefix hit would skip (the cache keeps
only K and V), so such a request takes none (Request.takes_prefix_hits). A prompt runs in
chunks, so each step contributes its chunk's part (the runner's `pooled_parts`) and the
engine combines them on the request (`add_part`); a recompute after preemption starts again
from position 0. The request is a one-token generation: its token is dropped.
"""

from __future__ import annotations

import torch

from .request import Request


def pooled_parts(rows: list[tuple[Request, int, int, int]], hidden: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """rows: (request, first hidden row, first prompt position, count) of this step's prompt
    positions of pooling requests -> request id: (first position, its part, fp32 on the host):
    for mean the sum of the chunk's states, for max their maximum, for first and last the one
    state once the chunk has it."""
    parts = {}
    for req, row, position, count in rows:
        pooling = req.sampling_params.pooling
        if pooling == "mean":
            parts[req.request_id] = (position, hidden[row:row + count].float().sum(0).cpu())
        elif pooling == "max":
            parts[req.request_id] = (position, hidden[row:row + count].amax(0).to("cpu", torch.float32))
        elif pooling == "first" and position == 0:
            parts[req.request_id] = (position, hidden[row].to("cpu", torch.float32, copy=True))
        elif pooling == "last" and position + count == req.num_prompt_tokens:
            parts[req.request_id] = (position, hidden[row + count - 1].to("cpu", torch.float32, copy=True))
    return parts


def add_part(req: Request, position: int, part: torch.Tensor) -> None:
    combine = _COMBINE.get(req.sampling_params.pooling)
    req.pooled = combine(req.pooled, part) if combine and position > 0 and req.pooled is not None else part


_COMBINE = {"mean": torch.add, "max": torch.maximum}  # one chunk's part with the earlier chunks'


def embedding_of(req: Request) -> list[float] | None:
    """The finished request's vector (not normalized: the API does that)."""
    if req.sampling_params.pooling is None or req.pooled is None:
        return None
    vector = req.pooled / req.num_prompt_tokens if req.sampling_params.pooling == "mean" else req.pooled
    return vector.tolist()
