"""ModelRunner: turns the scheduler's list of (request, new tokens) into tensors, runs the
model over the paged KV cache, and turns logits into sampled tokens. It owns the weights and
the K/V tensors but changes no request state: that is the scheduler's job."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loragate.kernels.sampling import logprobs_of, sample

from .batch import BatchMetadata, build_batch
from .host_memory import zeros_on_huge_pages
from .models.llama import LlamaForCausalLM
from .request import Request


@dataclass
class StepOutput:
    requests: list[Request]  # the requests that got a new token, in order
    token_ids: list[int]
    # Per request: (chosen logprob, {token: logprob}) or None when not asked for.
    logprobs: list[tuple[float, dict[int, float]] | None]
    num_computed_tokens: int  # tokens run through the model this step


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, lora_pool=None):
        self.model = model
        self.lora_pool = lora_pool
        self.block_size = block_size
        c = model.config
        shape = (c.num_layers, 2, num_blocks, c.num_kv_heads, block_size, c.head_dim)
        self.kv_cache = zeros_on_huge_pages(shape, model.dtype)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(c.num_layers)]

    @staticmethod
    def bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
        c = model.config
        return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> StepOutput:
        batch = build_batch(scheduled, self.block_size, lora_pool=self.lora_pool)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch)
        num_tokens = int(batch.input_ids.shape[0])
        if not batch.sampled_requests:
            return StepOutput([], [], [], num_tokens)
        logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        return self.sample(batch, logits, num_tokens)

    def sample(self, batch: BatchMetadata, logits: torch.Tensor, num_tokens: int) -> StepOutput:
        reqs = batch.sampled_requests
        params = [r.sampling_params for r in reqs]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        tokens = sample(logits, temperature, top_k, top_p, [r.generator for r in reqs])
        logprobs: list = [None] * len(reqs)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = torch.tensor(wanted)
            num_top = max(params[i].logprobs for i in wanted)
            chosen, top_vals, top_ids = logprobs_of(logits[rows], tokens[rows], num_top)
            for j, i in enumerate(wanted):
                n = params[i].logprobs
                logprobs[i] = (float(chosen[j]), dict(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist())))
        return StepOutput(reqs, tokens.tolist(), logprobs, num_tokens)
