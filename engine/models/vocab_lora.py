"""LoRA on the vocabulary modules: the input embedding (embed_tokens) and the output head
(lm_head), as peft computes them.

- embed_tokens: peft's embedding LoRA adds scaling * B @ A[:, token] to the row of each token
  (A [r, vocab], B [hidden, r]), to the embedding module's output: before Granite's multiplier
  (the model applies it), times Gemma's scale (the module has an embed_scale, which peft
  applies to the LoRA's output too).
- lm_head: a linear LoRA on the head, added to the logits before any softcap or divisor.

The pool holds them with one layer each (adapters/pool.py; scaling folded into B). A step
runs them per adapter over its rows: a step has at most as many adapters as slots, and the
work is small beside the head's own product.
"""

from __future__ import annotations

import itertools

import torch

from loragate.adapters.errors import AdapterError


def add_embedding_lora(x: torch.Tensor, input_ids: torch.Tensor, batch, scale: torch.Tensor | None = None) -> None:
    """x [tokens, hidden] += each LoRA row's embedding delta (times `scale`), in place."""
    lora = batch.lora
    if lora is None or "embed_tokens" not in lora.modules:
        return
    a, b = lora.pool.a["embed_tokens"][0], lora.pool.b["embed_tokens"][0]  # [slots, R, vocab], [slots, hidden, R]
    plan = lora.plan
    for start, count, slot in zip(plan.lora_start.tolist(), plan.lora_count.tolist(), plan.lora_slots.tolist()):
        ids = input_ids[start:start + count]
        h = a[slot, :lora.rank].index_select(1, ids).T  # [count, rank]: A's column per token
        delta = h @ b[slot, :, :lora.rank].T
        x[start:start + count] += delta if scale is None else delta * scale


def head_row_slots(batch, rows: torch.Tensor) -> list[int] | None:
    """The slot of each of a step's hidden-state rows `rows` where an adapter of the step has a
    head LoRA, else None."""
    lora = batch.lora
    if lora is None or "lm_head" not in lora.modules:
        return None
    per_token = lora.plan.token_slots if lora.plan is not None else lora.row_slots
    return per_token.cpu()[rows.cpu()].tolist()


def add_head_lora(logits: torch.Tensor, hidden: torch.Tensor, row_slots: list[int], lora) -> None:
    """logits [n, vocab] += the head's LoRA of each row's adapter (row_slots: -1 for none). A
    step's rows come grouped by slot (engine/batch.py sorts them), so each run of one slot is a
    slice: one fused multiply-add into it, no gather or scatter of [rows, vocab]."""
    if lora is None or "lm_head" not in lora.modules:
        return
    a, b = lora.pool.a["lm_head"][0], lora.pool.b["lm_head"][0]  # [slots, R, hidden], [slots, vocab, R]
    start = 0
    for slot, run in itertools.groupby(row_slots):
        end = start + len(list(run))
        if slot >= 0:
            logits[start:end].addmm_(hidden[start:end] @ a[slot, :lora.rank].T, b[slot, :, :lora.rank].T)
        start = end


def check_base_copies(model, weights) -> None:
    """peft loads the embedding and head it saved beside their LoRA over the base model's. The
    engine serves one shared base, so the copies must be the base's own (within the rounding of
    a dtype cast); a retrained or resized vocabulary is refused. Checked copies are dropped."""
    own = {"embed_tokens": model.embed_tokens.weight,
           "lm_head": model.embed_tokens.weight if model.lm_head is None else model.lm_head}
    for name, copy in sorted(weights.base_copies.items()):
        base = own[name].to(copy.device)
        if copy.shape == base.shape and torch.equal(copy.to(base.dtype), base):  # the usual case, and 6x faster
            continue
        if copy.shape != base.shape or not torch.allclose(copy.float(), base.float(), rtol=2 ** -7, atol=1e-6):
            raise AdapterError("unsupported_adapter", f"the adapter's copy of {name} (peft's {name}.base_layer) differs "
                               "from the base model's: it was trained or resized with the adapter, which a shared "
                               "base model cannot serve")
    weights.base_copies = {}
