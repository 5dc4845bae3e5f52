"""Attention over a paged KV cache for a packed, variable-length token batch (torch; CPU path).

Layout: each layer's cache is `[num_slots, num_kv_heads, head_dim]` with slot =
block_id * block_size + offset. Requests with few new tokens (decode, speculative
verification) run together as one padded batch; long prefill chunks run one request at a
time, where the per-call overhead is amortised over many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    token_start: int
    token_end: int
    # Cache slots of the whole context (cached prefix + this chunk) [ctx_len]; None when the
    # chunk is the entire context, so K/V can be used straight from the projection.
    context_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    # Padded batch of short-query requests (B requests, up to Q new tokens each).
    batch_query_index: torch.Tensor | None = None  # [B, Q] int64 token index (padding: 0)
    batch_valid_index: torch.Tensor | None = None  # [num_valid] int64 into the flattened [B*Q]
    batch_token_index: torch.Tensor | None = None  # [num_valid] int64 token index of each valid
    batch_context_slots: torch.Tensor | None = None  # [B, C] int64 cache slots (padding: 0)
    # [B, 1, group*Q, C] bool, True = may attend, rows ordered (query head in group, query);
    # None when every query may see every slot.
    batch_mask: torch.Tensor | None = None
    prefill_spans: list[PrefillSpan] = field(default_factory=list)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Semantics: k_cache[slot_mapping[i]] = k[i] (same for v). k, v: [num_tokens, kv_heads, d]."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Semantics: causal softmax attention of every new token over its request's context.

    q: [num_tokens, heads, d]; k, v: [num_tokens, kv_heads, d] (already written to the cache);
    caches: [num_slots, kv_heads, d]. Token t of a request whose context holds n tokens and that
    has m new tokens attends to context positions 0 .. n - m + (t's index among the m).
    Query head h uses KV head h // (heads / kv_heads). Returns [num_tokens, heads, d].
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    if meta.batch_query_index is not None:
        _batched_short_queries(q, k_cache, v_cache, meta, scale, out)
    for span in meta.prefill_spans:
        qs = q[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, m, d]
        if span.context_slots is None:
            ks = k[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)
            vs = v[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        else:
            ks = k_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0)
            m, n = qs.shape[2], ks.shape[2]
            # Bottom-right aligned causal mask: the chunk's last query sees the whole context.
            mask = torch.ones(m, n, dtype=torch.bool).tril_(diagonal=n - m)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        out[span.token_start:span.token_end] = o.squeeze(0).transpose(0, 1)
    return out


def _batched_short_queries(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
    B, Q = meta.batch_query_index.shape
    num_heads, d = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    C = meta.batch_context_slots.shape[1]
    # Fold the query heads that share a KV head into the query-length axis, so K/V are used
    # as they are instead of being repeated per query head: [B, kv_heads, group*Q, d].
    qb = q.index_select(0, meta.batch_query_index.view(-1)).view(B, Q, num_kv_heads, group, d)
    qb = qb.permute(0, 2, 3, 1, 4).reshape(B, num_kv_heads, group * Q, d)
    slots = meta.batch_context_slots.view(-1)
    kb = k_cache.index_select(0, slots).view(B, C, num_kv_heads, d).transpose(1, 2)
    vb = v_cache.index_select(0, slots).view(B, C, num_kv_heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.batch_mask, scale=scale)
    o = o.view(B, num_kv_heads, group, Q, d).permute(0, 3, 1, 2, 4).reshape(B * Q, num_heads, d)
    out.index_copy_(0, meta.batch_token_index, o.index_select(0, meta.batch_valid_index))
