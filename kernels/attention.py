"""Attention over a paged KV cache for a packed, variable-length token batch.

Layout: each layer's cache is `[num_blocks, num_kv_heads, block_size, head_dim]`; a token's
slot is block_id * block_size + offset. One KV head's rows of a block are contiguous, which
is what a decode kernel streams. Requests with few new tokens (decode, speculative
verification) form the "short" batch: on CPU a native kernel reads their K/V straight from
the blocks (kernels/native.py); the torch reference gathers them into one padded batch.
Long prefill chunks run one request at a time through SDPA, where the call overhead is
amortised over many tokens.

A sliding window (Gemma 3's local layers) limits each query to the last `window` positions,
its own included. The cache keeps every position, so one cache layout serves both kinds of
layer; the window is a mask (in the native kernel, in its softmax). A softcap (Gemma 2)
squashes the scaled scores into (-softcap, softcap) with tanh before the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import native

# On CUDA, SDPA with a mask would pick cuDNN's attention, which builds a graph per new shape:
# about 2 ms of host time per call on an H100 machine, and a decode step's context lengths are
# new every step. The others need no per-shape setup.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None,
          attn_mask: torch.Tensor | None = None, is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    if softcap is not None:
        return _softcapped(q, k, v, scale, softcap, attn_mask, is_causal)
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(_CUDA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _softcapped(q, k, v, scale: float, softcap: float, attn_mask, is_causal: bool) -> torch.Tensor:
    """SDPA's math with the scores capped first, which SDPA has no option for; in fp32."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril_()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


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
    block_size: int
    # The short-query batch, B requests (all None when empty):
    query_start: torch.Tensor | None = None  # [B] int64, first new token's index in the batch
    query_len: torch.Tensor | None = None  # [B] int64, new tokens (<= MAX_SHORT_QUERY)
    context_len: torch.Tensor | None = None  # [B] int64, context incl. the new tokens
    block_table: torch.Tensor | None = None  # [B, max_blocks] int64 (padding: 0)
    prefill_spans: list[PrefillSpan] = field(default_factory=list)
    use_native: bool = True
    _padded: tuple | None = field(default=None, repr=False)  # torch path's gather plan, built once per step
    _masks: dict = field(default_factory=dict, repr=False)  # the plan's masks by window, built once per step


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [blocks, kv_heads, block_size, d], slots [...] -> [..., kv_heads, d]."""
    block_size = cache.shape[2]
    return cache[slots // block_size, :, slots % block_size]


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slot] = values[i] for each slots[i]; values [T, kv_heads, d]."""
    block_size = cache.shape[2]
    cache[slots // block_size, :, slots % block_size] = values


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Semantics: causal softmax attention of every new token over its request's context.

    q: [num_tokens, heads, d]; k, v: [num_tokens, kv_heads, d] (already written to the cache);
    caches: [blocks, kv_heads, block_size, d]. Token t of a request whose context holds n tokens and that
    has m new tokens attends to context positions 0 .. n - m + (t's index among the m).
    Query head h uses KV head h // (heads / kv_heads). With a window, a query at position p
    sees only positions above p - window. With a softcap, scores s (scaled) become
    softcap * tanh(s / softcap). Returns [num_tokens, heads, d].
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    if meta.query_start is not None:
        if meta.use_native and native.supports(q, meta.block_size):
            native.paged_attention_short(q, k_cache, v_cache, out, meta.query_start, meta.query_len,
                                         meta.context_len, meta.block_table, meta.block_size, scale, window,
                                         softcap)
        else:
            _short_queries_reference(q, k_cache, v_cache, meta, scale, out, window, softcap)
    for span in meta.prefill_spans:
        qs = q[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, m, d]
        if span.context_slots is None:
            ks = k[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)
            vs = v[span.token_start:span.token_end].transpose(0, 1).unsqueeze(0)
        else:
            slots = span.context_slots
            if window is not None:  # nothing before the chunk's first query's window
                slots = slots[max(0, slots.shape[0] - (span.token_end - span.token_start) - window + 1):]
            ks = gather_slots(k_cache, slots).transpose(0, 1).unsqueeze(0)
            vs = gather_slots(v_cache, slots).transpose(0, 1).unsqueeze(0)
        m, n = qs.shape[2], ks.shape[2]
        if m == n and (window is None or n <= window):
            o = _sdpa(qs, ks, vs, scale, softcap, is_causal=True, enable_gqa=num_heads != num_kv_heads)
        else:
            # Bottom-right aligned causal mask: the chunk's last query sees the whole context.
            mask = torch.ones(m, n, dtype=torch.bool, device=q.device).tril_(diagonal=n - m)
            if window is not None and n > window:
                mask.triu_(diagonal=n - m - window + 1)  # query i (n - m + i here) sees > its position - window
            group = num_heads // num_kv_heads
            if group > 1 and q.is_cuda:
                # CUDA's SDPA kernels that take a mask do not take grouped heads: with enable_gqa
                # it falls back to its math path, 2.4-2.6x slower on the H100 (README, On a GPU).
                ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
            o = _sdpa(qs, ks, vs, scale, softcap, attn_mask=mask, enable_gqa=ks.shape[1] != num_heads)
        out[span.token_start:span.token_end] = o.squeeze(0).transpose(0, 1)
    return out


def _padded_plan(meta: AttentionMetadata) -> tuple:
    """Gather indices that turn the short batch into one padded SDPA call."""
    if meta._padded is None:
        B = meta.query_start.shape[0]
        Q, C = int(meta.query_len.max()), int(meta.context_len.max())
        i = torch.arange(Q, device=meta.query_len.device)
        query_index = (meta.query_start[:, None] + i).clamp(max=meta.slot_mapping.shape[0] - 1)  # [B, Q]
        is_valid = i[None, :] < meta.query_len[:, None]  # [B, Q]
        t = torch.arange(C, device=meta.query_len.device)
        block = meta.block_table.gather(1, (t // meta.block_size).expand(B, C).clamp(max=meta.block_table.shape[1] - 1))
        context_slots = block * meta.block_size + t % meta.block_size  # [B, C]
        query_pos = meta.context_len[:, None] - meta.query_len[:, None] + i  # [B, Q]
        meta._padded = (query_index, is_valid.view(-1).nonzero().squeeze(1), query_index[is_valid], context_slots,
                        query_pos)
    return meta._padded


def _padded_mask(meta: AttentionMetadata, group: int, window: int | None) -> torch.Tensor:
    """[B, 1, group*Q, C] (or [B, 1, 1, C] for one query a row): which context positions each
    query row sees, rows ordered (head in group, query) like the folded query layout."""
    if window not in meta._masks:
        *_, context_slots, query_pos = _padded_plan(meta)
        C = context_slots.shape[1]
        t = torch.arange(C, device=query_pos.device)[None, None, :]
        pos = query_pos[:, :, None]
        mask = (t <= pos) & (t < meta.context_len[:, None, None])  # [B, Q, C]
        if window is not None:
            mask &= t > pos - window
        meta._masks[window] = (mask if mask.shape[1] == 1 else mask.repeat(1, group, 1)).unsqueeze(1)
    return meta._masks[window]


def decode_metadata(slot_mapping: torch.Tensor, context_len: torch.Tensor, block_table: torch.Tensor,
                    block_size: int) -> AttentionMetadata:
    """The short batch's metadata for rows of one new token each, where row i sees the first
    context_len[i] slots of its cache (block_table[i]). Made without reading anything back to
    the host: every shape follows the arguments' (the context is block_table's width), so a
    CUDA graph can capture it (engine/cuda_graphs.py). Runs the torch path."""
    B, blocks = block_table.shape
    rows = torch.arange(B, device=block_table.device)
    t = torch.arange(blocks * block_size, device=block_table.device)
    context_slots = block_table.repeat_interleave(block_size, dim=1) * block_size + t % block_size  # [B, C]
    meta = AttentionMetadata(slot_mapping, block_size, query_start=rows, query_len=torch.ones_like(rows),
                             context_len=context_len, block_table=block_table, use_native=False)
    meta._padded = (rows[:, None], rows, rows, context_slots, (context_len - 1)[:, None])
    return meta


def _short_queries_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out,
                             window: int | None = None, softcap: float | None = None) -> None:
    num_heads, d = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    query_index, valid_rows, valid_tokens, context_slots, _ = _padded_plan(meta)
    mask = _padded_mask(meta, group, window)
    B, Q = query_index.shape
    # Fold the query heads that share a KV head into the query axis, so K/V are used as they
    # are instead of being repeated per query head: [B, kv_heads, group*Q, d].
    qb = q.index_select(0, query_index.view(-1)).view(B, Q, num_kv_heads, group, d)
    qb = qb.permute(0, 2, 3, 1, 4).reshape(B, num_kv_heads, group * Q, d)
    kb = gather_slots(k_cache, context_slots).transpose(1, 2)  # [B, kv_heads, C, d]
    vb = gather_slots(v_cache, context_slots).transpose(1, 2)
    o = _sdpa(qb, kb, vb, scale, softcap, attn_mask=mask)
    o = o.view(B, num_kv_heads, group, Q, d).permute(0, 3, 1, 2, 4).reshape(B * Q, num_heads, d)
    out.index_copy_(0, valid_tokens, o.index_select(0, valid_rows))
