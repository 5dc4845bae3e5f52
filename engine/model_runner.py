"""ModelRunner: turns the scheduler's list of (request, new tokens) into tensors, runs the
model over the paged KV cache, and turns logits into sampled tokens. It owns the weights and
the K/V tensors but changes no request state: that is the scheduler's job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loragate.kernels.sampling import greedy, logprobs_of, sample
from loragate.kernels.spec_sampling import accept_greedy, accept_sampled, sampling_probs

from .batch import BatchMetadata, build_batch
from .cuda_graphs import DecodeGraphs
from .host_memory import zeros_on_huge_pages
from .kv_layout import KVLayout, kv_layout
from .logits_processors import adjust_logits
from .models.llama import LlamaForCausalLM
from .models.vocab_lora import head_row_slots
from .pooling import pooled_parts
from .request import Request


@dataclass
class StepOutput:
    requests: list[Request]  # the requests that got new tokens, in order
    # Per request: the tokens it emits this step (one, or up to 1 + k when verifying k
    # speculative tokens), how many of its speculative tokens were accepted, and per emitted
    # token (chosen logprob, {token: logprob}) or None when logprobs were not asked for.
    token_ids: list[list[int]]
    num_accepted: list[int]
    logprobs: list[list[tuple[float, dict[int, float]]] | None]
    num_computed_tokens: int  # tokens run through the model this step
    # Only when the runner exposes them (a proposer that drafts from the target's features):
    # per request id, the final hidden states [num_logits, hidden] of its sampled positions.
    hidden_states: dict[str, torch.Tensor] | None = None
    # Per request asking for them: the logprobs of the prompt tokens this step reached, in order.
    prompt_logprobs: dict[str, list[tuple[float, dict[int, float], int]]] | None = None
    # Per request wanting an embedding: (first prompt position, part), engine/pooling.py.
    pooled: dict[str, tuple[int, torch.Tensor]] | None = None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, lora_pool=None,
                 cuda_graph_rows: int = 0, layout: KVLayout | None = None):
        """cuda_graph_rows: on CUDA, steps of short queries (decode, speculative verification)
        with up to this many tokens replay CUDA graphs (engine/cuda_graphs.py); 0: none do.
        layout: how the layers share the cache's blocks (default: every layer in one group)."""
        self.model = model
        self.lora_pool = lora_pool
        self.block_size = block_size
        c = model.config
        layout = layout or kv_layout((), c.num_layers, 1)
        # A block holds layers_per_page layers; each layer uses its slot in every block, at the
        # block ids of its group's table. One block more than the cache manager hands out: a
        # captured step's padded rows and the tables' given-back entries use it.
        shape = (layout.layers_per_page, 2, num_blocks + 1, c.num_kv_heads, block_size, c.head_dim)
        self.device = model.device
        self.kv_cache = (zeros_on_huge_pages(shape, model.dtype) if self.device.type == "cpu"
                         else torch.zeros(shape, dtype=model.dtype, device=self.device))
        self.kv_caches = [(self.kv_cache[slot, 0], self.kv_cache[slot, 1], group) for group, slot in layout.layer_places]
        self.expose_hidden_states = False
        self.graphs = None
        # A sparse-expert step's shapes depend on its routing, which a captured graph cannot follow.
        if cuda_graph_rows > 0 and self.device.type == "cuda" and not c.is_moe:
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, num_blocks, cuda_graph_rows, lora_pool)

    def copy_block_rows(self, src: int, dst: int, num_rows: int) -> None:
        """Copy block src's first num_rows token rows of K and V into block dst, in every layer
        (KVCacheManager.copy_rows: a kept partial block's rows reused)."""
        self.kv_cache[:, :, dst, :, :num_rows] = self.kv_cache[:, :, src, :, :num_rows]

    @staticmethod
    def bytes_per_block(model: LlamaForCausalLM, block_size: int, layout: KVLayout) -> int:
        c = model.config
        return 2 * layout.layers_per_page * block_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize

    def forward(self, scheduled: list[tuple[Request, int]]) -> tuple[BatchMetadata, torch.Tensor]:
        """Build the step's batch (on the host, moved to the model's device) and run the model
        over it: returns the batch and the final hidden states [num_tokens, hidden]."""
        batch = build_batch(scheduled, self.block_size, lora_pool=self.lora_pool)
        if self.device.type != "cuda":
            return self._run(batch)
        # torch ops follow their tensors' device, but flashinfer launches on the calling
        # thread's current device, which is GPU 0 in a new thread (the engine's loop)
        with torch.cuda.device(self.device):
            return self._run(batch)

    def _run(self, batch: BatchMetadata) -> tuple[BatchMetadata, torch.Tensor]:
        key = None if self.graphs is None else self.graphs.key(batch)
        hidden = None if key is None else self.graphs.run(batch, key)
        if hidden is not None:
            return dataclasses.replace(batch, logits_indices=batch.logits_indices.to(self.device)), hidden
        batch = batch.to(self.device)
        return batch, self.model(batch.input_ids, batch.positions, self.kv_caches, batch)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> StepOutput:
        batch, hidden = self.forward(scheduled)
        num_tokens = int(batch.input_ids.shape[0])
        prompt_logprobs = self._prompt_logprobs(batch, hidden) if batch.prompt_logprob_rows else None
        pooled = pooled_parts(batch.pooling_rows, hidden) if batch.pooling_rows else None
        if not batch.sampled_requests:
            return StepOutput([], [], [], [], num_tokens, prompt_logprobs=prompt_logprobs, pooled=pooled)
        rows = hidden.index_select(0, batch.logits_indices)
        # Sampling runs on the host, whatever the device: per-request seeded generators, logits
        # processors and grammar masks are host-side, and [requests, vocab] is a small copy.
        logits = self.model.compute_logits(rows, fp32=False, lora=batch.lora,
                                           row_slots=head_row_slots(batch, batch.logits_indices))
        out = self.sample(batch, logits.cpu(), num_tokens)
        out.prompt_logprobs, out.pooled = prompt_logprobs, pooled
        if self.expose_hidden_states:
            ends = torch.tensor(batch.num_logits).cumsum(0).tolist()
            out.hidden_states = {r.request_id: rows[end - n:end]
                                 for r, n, end in zip(batch.sampled_requests, batch.num_logits, ends)}
        return out

    # Prompt rows turned into logits at a time: [rows, vocab] fp32 is 50 MB at 256 x 49k.
    PROMPT_LOGITS_CHUNK = 256

    def _prompt_logprobs(self, batch: BatchMetadata, hidden: torch.Tensor) -> dict:
        out = {}
        for req, row, position, count in batch.prompt_logprob_rows:
            k = req.sampling_params.prompt_logprobs
            targets = torch.tensor(req.prompt_token_ids[position + 1:position + 1 + count])
            entries = out[req.request_id] = []
            for i in range(0, count, self.PROMPT_LOGITS_CHUNK):
                n = min(self.PROMPT_LOGITS_CHUNK, count - i)
                logits = self.model.compute_logits(hidden[row + i:row + i + n], lora=batch.lora,
                                                   row_slots=[req.lora_slot] * n).cpu()
                chosen, top_vals, top_ids = logprobs_of(logits, targets[i:i + n], k)
                # vLLM's rank: tokens at least as likely, itself included (a logit's order is its logprob's)
                ranks = (logits >= logits.gather(1, targets[i:i + n, None])).sum(1)
                entries.extend((lp, dict(zip(ids, vals)), rank) for lp, ids, vals, rank
                               in zip(chosen.tolist(), top_ids.tolist(), top_vals.tolist(), ranks.tolist()))
        return out

    def sample(self, batch: BatchMetadata, logits: torch.Tensor, num_tokens: int) -> StepOutput:
        reqs = batch.sampled_requests
        adjusted = adjust_logits(reqs, batch.num_logits, logits)
        if len(logits) == len(reqs):  # no speculative tokens to verify: one batched draw
            tokens = self._sample_rows(reqs, adjusted).tolist()
            emitted = [[t] for t in tokens]
            starts = list(range(len(reqs)))
        else:
            emitted, starts = self._verify(reqs, batch.num_logits, adjusted)
        num_accepted = [len(e) - 1 for e in emitted]
        logprobs = self._logprobs(reqs, logits, emitted, starts)  # the model's own distribution
        return StepOutput(reqs, emitted, num_accepted, logprobs, num_tokens)

    @staticmethod
    def _sample_rows(reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32) if any(p.min_p for p in params) else None
        return sample(logits, temperature, top_k, top_p, [r.generator for r in reqs], min_p)

    @staticmethod
    def _verify(reqs: list[Request], num_logits: list[int], logits: torch.Tensor) -> tuple[list[list[int]], list[int]]:
        """Accept or reject each request's speculative tokens (see kernels/spec_sampling)."""
        argmax = greedy(logits).tolist()
        emitted, starts, row = [], [], 0
        for req, n in zip(reqs, num_logits):
            starts.append(row)
            draft = req.spec_token_ids[: n - 1]
            p = req.sampling_params
            if p.is_greedy:
                emitted.append(accept_greedy(argmax[row:row + n], draft))
            else:
                probs = sampling_probs(logits[row:row + n].float(), p.temperature, p.top_k, p.top_p, p.min_p)
                q = req.spec_draft_probs[: n - 1] if req.spec_draft_probs is not None else None
                emitted.append(accept_sampled(probs, draft, q, req.generator))
            row += n
        return emitted, starts

    @staticmethod
    def _logprobs(reqs, logits, emitted, starts) -> list:
        out: list = [None] * len(reqs)
        wanted = [i for i, r in enumerate(reqs) if r.sampling_params.logprobs is not None]
        if not wanted:
            return out
        rows = torch.tensor([starts[i] + j for i in wanted for j in range(len(emitted[i]))])
        chosen_ids = torch.tensor([t for i in wanted for t in emitted[i]])
        num_top = max(reqs[i].sampling_params.logprobs for i in wanted)
        chosen, top_vals, top_ids = logprobs_of(logits[rows].float(), chosen_ids, num_top)
        r = 0
        for i in wanted:
            n = reqs[i].sampling_params.logprobs
            out[i] = []
            for _ in emitted[i]:
                out[i].append((float(chosen[r]), dict(zip(top_ids[r, :n].tolist(), top_vals[r, :n].tolist()))))
                r += 1
        return out
