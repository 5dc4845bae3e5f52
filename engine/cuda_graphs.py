"""Steps of short queries replayed as CUDA graphs: decode, and speculative verification.

On a GPU, a small model's decode step is bound by the host, not the GPU. Each of its ~1,000
kernels does a few microseconds of work, and each costs tens of microseconds of Python and
launch overhead. A CUDA graph records a step's launches once; after that, one call replays
them all.

A graph fixes every shape and address, so a captured step works on token rows, padded:
- the rows to one of ROW_SIZES;
- the context to a power of two of KV blocks.
Each row is one new token. It attends to its request's cache up to its own position, so a
request verifying k speculative tokens is simply 1 + k rows (their K/V are written before
attention reads). Padded rows read and write only a scratch KV block that the engine never
hands out (the runner allocates one block more than the cache manager knows of).

A step's inputs go in through one static int64 tensor, copied from pinned host memory in one
transfer. Per row, it holds the token, position, context length, LoRA slot and row of the
row-term tables, then per group of layers (engine/kv_layout.py) its cache slot, then per
group its block table. Attention and LoRA take forms that never read back to the host
(kernels/attention.decode_metadata, kernels/lora.add_lora_rows). Graphs are keyed by rows,
blocks, LoRA rank and targeted modules, and captured the first time a step needs one. They
share one memory pool, since only one replays at a time.

Adapters with row terms (DoRA, lora_bias) rescale and shift their rows from per-slot tables.
A table is made when the first adapter that needs it loads, so graphs that apply terms are
also keyed by how many tables exist: a graph captured before a table existed would skip it.

Steps that these graphs do not take run eagerly: those with a prefill chunk longer than the
short-query limit (engine/batch.py), and those with more rows or longer contexts than the
largest graph. The largest graph's rows times context is bounded (MAX_ROW_CONTEXT): attention
gathers each row's padded context, and a capture holds that memory.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict

import torch

from loragate.kernels.attention import decode_metadata

from .batch import BatchMetadata, LoraBatch

log = logging.getLogger("loragate.engine")

ROW_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_BLOCKS = 4
# Most rows x context tokens in a graph: its attention gathers that many K and V vectors per
# layer (Qwen2.5-1.5B: 0.5 GiB of K and V at this bound), memory the capture keeps.
MAX_ROW_CONTEXT = 1 << 19
# Captured graphs kept (least recently used dropped first): each holds its own launch list,
# while the activations live in the shared pool.
MAX_GRAPHS = 128
TOKEN, POSITION, CONTEXT, LORA_SLOT, TERM_SLOT = range(5)
COLUMNS = 5  # then each group's cache slot, then each group's block table


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Graph:
    """One captured step shape: its static input (device), pinned staging copy (host) and the
    row that pads it."""

    def __init__(self, ints: torch.Tensor, host: torch.Tensor, padding: torch.Tensor, step, pool) -> None:
        self.ints, self.host, self.padding, self.step = ints, host, padding, step
        self.graph = None
        if pool is None:  # eager: the same computation without capture (CPU tests)
            return
        side = torch.cuda.Stream(ints.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # once eagerly first: lazy set-up (cuBLAS workspaces, our caches) must not be captured
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: freeing another graph then (one of an engine
        # gone, or evicted) is a CUDA call a capture forbids, and it invalidates the capture.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # thread_local: other threads (the gateway computing DoRA scales) may use the GPU meanwhile
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.hidden = step()
        finally:
            if collecting:
                gc.enable()

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.hidden


class DecodeGraphs:
    """The runner's captured steps. `capture=False` runs the identical padded, sync-free
    computation eagerly, so it can be tested against the regular path anywhere."""

    def __init__(self, model, kv_caches, block_size: int, scratch_block: int, max_rows: int, lora_pool=None,
                 capture: bool = True):
        self.model, self.kv_caches, self.block_size, self.lora_pool = model, kv_caches, block_size, lora_pool
        self.scratch_block = scratch_block
        self.num_groups = max(group for _, _, group in kv_caches) + 1
        self.identity_row = lora_pool.num_slots if lora_pool is not None else 0  # of the row-term tables
        self.sizes = [s for s in ROW_SIZES if s < max_rows] + [next((s for s in ROW_SIZES if s >= max_rows),
                                                                    ROW_SIZES[-1])]
        self.max_blocks = -(-model.rope_cos.shape[0] // block_size)  # the model's longest context
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.enabled = True
        self.num_captured = 0  # since start (/metrics)
        self.num_replayed = 0

    def key(self, batch: BatchMetadata) -> tuple | None:
        """The graph that runs this (host-side) batch, or None when it runs eagerly."""
        n, a, lora = batch.input_ids.numel(), batch.attention, batch.lora
        if not self.enabled or n == 0 or n > self.sizes[-1] or a.prefill_spans:
            return None
        blocks = min(max(_next_power_of_two(a.block_table.shape[1]), MIN_BLOCKS), self.max_blocks)
        rows = next(s for s in self.sizes if s >= n)
        if blocks < a.block_table.shape[1] or rows * blocks * self.block_size > MAX_ROW_CONTEXT:
            return None
        if lora is None:
            return rows, blocks, None
        if "embed_tokens" in lora.modules:  # its LoRA runs per adapter segment, which a graph does not have
            return None
        # With row terms, the tables that exist now: one made later needs a new graph.
        terms = self.lora_pool.row_tables_made if lora.row_terms else None
        return rows, blocks, (min(_next_power_of_two(lora.rank), self.lora_pool.max_rank), lora.modules, terms)

    def run(self, batch: BatchMetadata, key: tuple) -> torch.Tensor | None:
        """Final hidden states [tokens, hidden] of the batch, valid until the next step; None when
        the graph cannot be captured (then no step uses graphs again, and this one runs eagerly)."""
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key)
            if g is None:
                return None
        self.graphs.move_to_end(key)
        n, a, lora = batch.input_ids.numel(), batch.attention, batch.lora
        host, width = g.host, a.block_table.shape[1]
        host[n:] = g.padding  # rows a larger earlier step filled
        host[:n, TOKEN] = batch.input_ids
        host[:n, POSITION] = batch.positions
        host[:n, CONTEXT] = batch.positions + 1  # a row sees its request's cache up to itself
        # Every token is in the short batch, whose requests are packed in token order.
        plan = None if lora is None else lora.plan
        slots = torch.full((n,), -1) if plan is None else plan.slot_ids.repeat_interleave(plan.seg_indptr.diff())
        host[:n, LORA_SLOT] = slots
        # Each row's row of the term tables (DoRA, lora_bias): its slot's, or the identity row.
        terms = (torch.tensor(self.lora_pool.slot_row_terms + [False])[slots] if lora is not None and lora.row_terms
                 else torch.zeros(n, dtype=torch.bool))
        host[:n, TERM_SLOT] = torch.where(terms, slots, self.identity_row)
        for group in range(self.num_groups):
            ga, table = batch.attention_of(group), self._table(group, key[1])
            host[:n, COLUMNS + group] = ga.slot_mapping
            host[:n, table.start:table.start + width] = ga.block_table.repeat_interleave(a.query_len, dim=0)
            host[:n, table.start + width:table.stop] = 0  # past the context: masked
        g.ints.copy_(host)  # blocking: the next step rewrites `host`, and this copy is tiny
        self.num_replayed += 1
        return g.replay()[:n]

    def _table(self, group: int, blocks: int) -> slice:
        """The columns of a group's block table in a row of a graph with `blocks` blocks."""
        first = COLUMNS + self.num_groups + group * blocks
        return slice(first, first + blocks)

    def _padding(self, blocks: int) -> torch.Tensor:
        """A padded row: one token at position 0 in the scratch block, no adapter."""
        groups = self.num_groups
        row = torch.zeros(COLUMNS + groups * (1 + blocks), dtype=torch.int64)
        row[CONTEXT] = 1
        row[LORA_SLOT] = -1
        row[TERM_SLOT] = self.identity_row
        row[COLUMNS:COLUMNS + groups] = self.scratch_block * self.block_size
        for group in range(groups):
            row[self._table(group, blocks).start] = self.scratch_block  # each table's first entry
        return row

    def _capture(self, key: tuple) -> _Graph | None:
        rows, blocks, lora_key = key
        capture = self.pool is not None
        padding = self._padding(blocks)
        host = padding.repeat(rows, 1)
        if capture:
            host = host.pin_memory()
        ints = host.to(self.kv_caches[0][0].device)

        def step() -> torch.Tensor:
            groups = self.num_groups
            attention = [decode_metadata(ints[:, COLUMNS + g], ints[:, CONTEXT], ints[:, self._table(g, blocks)],
                                         self.block_size) for g in range(groups)]
            lora = None if lora_key is None else LoraBatch(
                None, self.lora_pool, lora_key[0], lora_key[1], row_slots=ints[:, LORA_SLOT],
                row_term_slots=None if lora_key[2] is None else ints[:, TERM_SLOT])
            batch = BatchMetadata(ints[:, TOKEN], ints[:, POSITION], attention[0], torch.empty(0, dtype=torch.int64),
                                  [], [], use_native_kernels=False, lora=lora,
                                  group_attention=attention if groups > 1 else None)
            return self.model(batch.input_ids, batch.positions, self.kv_caches, batch)

        t0 = time.perf_counter()
        try:
            g = _Graph(ints, host, padding, step, self.pool)
        except Exception as e:  # an op that cannot be captured: never fail the step for it
            log.warning("CUDA graph capture failed (%s: %s); every step runs eagerly from now on", type(e).__name__, e)
            self.enabled = False
            return None
        self.graphs[key] = g
        self.num_captured += 1
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        if capture:
            log.debug("captured a step graph in %.0f ms: %d rows, %d blocks, LoRA (rank, modules, tables) %s",
                      (time.perf_counter() - t0) * 1e3, rows, blocks, lora_key)
        return g
