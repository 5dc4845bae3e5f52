"""BatchMetadata: everything one forward step needs besides the weights, built fresh per step
from the scheduled requests and passed down explicitly (no module-level state)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from loragate.kernels.attention import AttentionMetadata, PrefillSpan
from loragate.kernels.lora import SHORT_SEGMENT, LoraPlan, plan_segments

from .request import Request

# Requests with at most this many new tokens join the short-query attention batch (decode,
# speculative verification); longer chunks get their own attention call.
MAX_SHORT_QUERY = 16


@dataclass
class LoraBatch:
    plan: LoraPlan | None
    pool: object  # adapters.pool.LoraSlotPool
    rank: int  # largest rank among this step's adapters: stacks are sliced to it
    modules: frozenset[str]  # modules some adapter of this step targets
    # Segments whose adapters add row terms (DoRA, lora_bias; engine/models/slot_rows.py):
    # (first row, end row, slot); in a short batch also each row's slot, or num_slots for the others.
    row_terms: list[tuple[int, int, int]] = field(default_factory=list)
    row_term_slots: torch.Tensor | None = None
    # A step replayed as a CUDA graph (engine/cuda_graphs.py) has no plan: each row's slot (-1: none).
    row_slots: torch.Tensor | None = None


@dataclass
class BatchMetadata:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attention: AttentionMetadata  # the first group of layers' (engine/kv_layout.py)
    # Rows of the hidden states whose logits the sampled requests need, request by request:
    # one row each, or 1 + k rows for a request verifying k speculative tokens.
    logits_indices: torch.Tensor  # [sum(num_logits)] int64
    sampled_requests: list[Request]
    num_logits: list[int]  # per sampled request
    use_native_kernels: bool = True
    lora: LoraBatch | None = None  # None: no request of this step uses an adapter
    # Prompt positions whose logprobs were asked for: (request, first hidden row, its
    # position, count); position p's row predicts prompt token p + 1.
    prompt_logprob_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)
    # Prompt positions of requests that want an embedding (engine/pooling.py): (request,
    # first hidden row, its position, count).
    pooling_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)
    # Every group's, where the layers' K/V are in more than one group (windowed layers).
    group_attention: list[AttentionMetadata] | None = None

    def attention_of(self, group: int) -> AttentionMetadata:
        return self.attention if self.group_attention is None else self.group_attention[group]

    def to(self, device: torch.device) -> BatchMetadata:
        """The step's index tensors on the model's device (they are built on the host). The
        LoRA plan stays on the host: the kernels copy what they need once per step."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        def move_attention(a: AttentionMetadata) -> AttentionMetadata:
            return dataclasses.replace(
                a, slot_mapping=move(a.slot_mapping), query_start=move(a.query_start), query_len=move(a.query_len),
                context_len=move(a.context_len), block_table=move(a.block_table),
                prefill_spans=[dataclasses.replace(s, context_slots=move(s.context_slots)) for s in a.prefill_spans])

        groups = None if self.group_attention is None else [move_attention(a) for a in self.group_attention]
        lora = self.lora and dataclasses.replace(self.lora, row_term_slots=move(self.lora.row_term_slots))
        return dataclasses.replace(self, input_ids=move(self.input_ids), positions=move(self.positions),
                                   logits_indices=move(self.logits_indices), lora=lora, group_attention=groups,
                                   attention=groups[0] if groups else move_attention(self.attention))


def build_batch(scheduled: list[tuple[Request, int]], block_size: int, use_native_kernels: bool = True,
                lora_pool=None) -> BatchMetadata:
    """scheduled: (request, number of new tokens to compute). With adapters in play the
    requests are reordered so each adapter's tokens form one contiguous segment."""
    slots = [req.lora_slot for req, _ in scheduled]
    uses_lora = lora_pool is not None and any(s >= 0 for s in slots)
    if uses_lora:
        scheduled = sorted(scheduled, key=lambda item: item[0].lora_slot)
    input_ids: list[int] = []
    positions: list[int] = []
    logits_indices: list[int] = []
    sampled: list[Request] = []
    num_logits: list[int] = []
    chunks: list[tuple[Request, int, int, int]] = []  # (request, token_start, start, end)
    prompt_rows: list[tuple[Request, int, int, int]] = []
    pooling_rows: list[tuple[Request, int, int, int]] = []
    for req, num_new in scheduled:
        start = req.num_computed_tokens
        end = start + num_new
        token_start = len(input_ids)
        tokens = req.all_token_ids
        if end > len(tokens):  # the step verifies speculative tokens after the newest one
            tokens = tokens + req.spec_token_ids
        input_ids.extend(tokens[start:end])
        positions.extend(range(start, end))
        chunks.append((req, token_start, start, end))
        if req.sampling_params.pooling and start < req.num_prompt_tokens:
            pooling_rows.append((req, token_start, start, min(end, req.num_prompt_tokens) - start))
        if req.needs_prompt_logprobs:  # positions not yet reported (a recompute repeats none)
            first = max(start, len(req.prompt_logprobs))
            count = min(end, req.num_prompt_tokens - 1) - first
            if count > 0:
                prompt_rows.append((req, token_start + first - start, first, count))
        if end >= req.num_tokens:  # the chunk reaches the newest token: sample the next one(s)
            n = end - req.num_tokens + 1
            logits_indices.extend(range(token_start + num_new - n, token_start + num_new))
            sampled.append(req)
            num_logits.append(n)
    num_groups = max([1] + [len(req.block_tables) for req, _ in scheduled])
    groups = [_attention(chunks, g, block_size, use_native_kernels) for g in range(num_groups)]
    lora = _lora_batch(scheduled, lora_pool) if uses_lora else None
    return BatchMetadata(
        lora=lora,
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        attention=groups[0],
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        sampled_requests=sampled,
        num_logits=num_logits,
        use_native_kernels=use_native_kernels,
        prompt_logprob_rows=prompt_rows,
        pooling_rows=pooling_rows,
        group_attention=groups if len(groups) > 1 else None,
    )


def _attention(chunks: list[tuple[Request, int, int, int]], group: int, block_size: int,
               use_native_kernels: bool) -> AttentionMetadata:
    """One group of layers' attention over its block tables: where the new tokens' K/V go, and
    the short queries' and prefill chunks' contexts."""
    slot_mapping: list[int] = []
    short: list[tuple[int, int, int, list[int]]] = []  # (token_start, num_new, context_len, blocks)
    spans: list[PrefillSpan] = []
    for req, token_start, start, end in chunks:
        blocks = req.block_tables[group] if req.block_tables else []
        slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        if end - start <= MAX_SHORT_QUERY:
            short.append((token_start, end - start, end, blocks))
        else:
            slots = None if start == 0 else _context_slots(blocks, end, block_size)
            spans.append(PrefillSpan(token_start, token_start + end - start, slots))
    attention = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64), block_size=block_size,
                                  prefill_spans=spans, use_native=use_native_kernels)
    if short:
        max_blocks = max(-(-ctx // block_size) for _, _, ctx, _ in short)
        attention.query_start = torch.tensor([s for s, _, _, _ in short], dtype=torch.int64)
        attention.query_len = torch.tensor([n for _, n, _, _ in short], dtype=torch.int64)
        attention.context_len = torch.tensor([c for _, _, c, _ in short], dtype=torch.int64)
        attention.block_table = torch.tensor(
            [b[: -(-c // block_size)] + [0] * (max_blocks - -(-c // block_size)) for _, _, c, b in short], dtype=torch.int64)
    return attention


def _lora_batch(scheduled: list[tuple[Request, int]], pool) -> LoraBatch:
    indptr, slot_ids = [0], []
    for req, num_new in scheduled:
        if slot_ids and slot_ids[-1] == req.lora_slot:
            indptr[-1] += num_new
        else:
            slot_ids.append(req.lora_slot)
            indptr.append(indptr[-1] + num_new)
    used = [s for s in slot_ids if s >= 0]
    with_terms = [s >= 0 and pool.slot_row_terms[s] for s in slot_ids]
    plan = plan_segments(indptr, slot_ids, frozenset(s for s, terms in zip(slot_ids, with_terms) if terms))
    batch = LoraBatch(plan, pool, pool.max_rank_of(used), pool.modules_of(used))
    batch.row_terms = [(indptr[i], indptr[i + 1], s) for i, s in enumerate(slot_ids) if with_terms[i]]
    if batch.row_terms and indptr[-1] <= SHORT_SEGMENT:
        rows = [s if with_terms[i] else pool.num_slots for i, s in enumerate(slot_ids)
                for _ in range(indptr[i + 1] - indptr[i])]
        batch.row_term_slots = torch.tensor(rows, dtype=torch.int64)
    return batch


def _context_slots(blocks: list[int], context_len: int, block_size: int) -> torch.Tensor:
    ids = torch.tensor(blocks[: -(-context_len // block_size)], dtype=torch.int64)
    slots = (ids[:, None] * block_size + torch.arange(block_size)).view(-1)
    return slots[:context_len]
