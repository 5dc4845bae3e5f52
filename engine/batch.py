"""BatchMetadata: everything one forward step needs besides the weights, built fresh per step
from the scheduled requests and passed down explicitly (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loragate.kernels.attention import AttentionMetadata, PrefillSpan

from .request import Request

# Requests with at most this many new tokens join the padded short-query attention batch;
# longer chunks get their own attention call, where its overhead is amortised.
MAX_BATCHED_QUERY_LEN = 16


@dataclass
class BatchMetadata:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attention: AttentionMetadata
    # Row of the hidden states whose logits each sampled request needs.
    logits_indices: torch.Tensor  # [num_sampled] int64
    sampled_requests: list[Request]


def build_batch(scheduled: list[tuple[Request, int]], block_size: int, num_queries_per_kv: int) -> BatchMetadata:
    """scheduled: (request, number of new tokens to compute) in batch order."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    logits_indices: list[int] = []
    sampled: list[Request] = []
    short: list[tuple[int, int, int, Request]] = []  # (token_start, num_new, context_len, request)
    spans: list[PrefillSpan] = []
    for req, num_new in scheduled:
        start = req.num_computed_tokens
        end = start + num_new
        token_start = len(input_ids)
        input_ids.extend(req.all_token_ids[start:end])
        positions.extend(range(start, end))
        blocks = req.block_ids
        slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        if num_new <= MAX_BATCHED_QUERY_LEN:
            short.append((token_start, num_new, end, req))
        else:
            slots = None if start == 0 else _context_slots(blocks, end, block_size)
            spans.append(PrefillSpan(token_start, token_start + num_new, slots))
        if end == req.num_tokens:  # the chunk reaches the newest token: sample the next one
            logits_indices.append(token_start + num_new - 1)
            sampled.append(req)
    attention = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64), prefill_spans=spans)
    if short:
        _fill_short_batch(attention, short, block_size, num_queries_per_kv)
    return BatchMetadata(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        attention=attention,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        sampled_requests=sampled,
    )


def _context_slots(blocks: list[int], context_len: int, block_size: int) -> torch.Tensor:
    ids = torch.tensor(blocks[: -(-context_len // block_size)], dtype=torch.int64)
    slots = (ids[:, None] * block_size + torch.arange(block_size)).view(-1)
    return slots[:context_len]


def _fill_short_batch(attention: AttentionMetadata, short, block_size: int, group: int) -> None:
    B = len(short)
    Q = max(n for _, n, _, _ in short)
    C = max(ctx for _, _, ctx, _ in short)
    query_index = torch.zeros(B, Q, dtype=torch.int64)
    context_slots = torch.zeros(B, C, dtype=torch.int64)
    valid: list[int] = []
    token_index: list[int] = []
    query_pos = torch.zeros(B, Q, dtype=torch.int64)  # absolute position of each query
    context_len = torch.zeros(B, 1, dtype=torch.int64)
    for b, (token_start, n, ctx, req) in enumerate(short):
        query_index[b, :n] = torch.arange(token_start, token_start + n)
        query_pos[b] = torch.arange(ctx - n, ctx - n + Q)
        context_len[b, 0] = ctx
        context_slots[b, :ctx] = _context_slots(req.block_ids, ctx, block_size)
        valid.extend(range(b * Q, b * Q + n))
        token_index.extend(range(token_start, token_start + n))
    attention.batch_query_index = query_index
    attention.batch_context_slots = context_slots
    attention.batch_valid_index = torch.tensor(valid, dtype=torch.int64)
    attention.batch_token_index = torch.tensor(token_index, dtype=torch.int64)
    uniform = Q == 1 and all(ctx == C for _, _, ctx, _ in short)
    if not uniform:
        key_pos = torch.arange(C)
        # [B, Q, C]: key visible if causal for that query and inside the request's context.
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < context_len[:, :, None])
        attention.batch_mask = mask.repeat(1, group, 1).unsqueeze(1)  # rows (group, Q)
