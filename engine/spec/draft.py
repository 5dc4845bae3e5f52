"""Draft-model proposer: a smaller model with the target's tokenizer drafts k tokens for all
speculating requests in batched forward passes over its own paged KV cache.

Each target request has a shadow request in the draft's cache. Before drafting, the shadow
is synced with the target's tokens: the draft's K/V stays valid up to the longest common
prefix of what it computed (including its own drafts) and what the target accepted; the rest
is rolled back by truncating its block table, and the tokens it has not seen are caught up
(the whole prompt the first time) in the first draft forward of the step. A request with
an output format drafts within it: each drafted token comes from logits masked by the
request's grammar, whose matcher consumes the drafts and rolls them back afterwards.

The draft may have fewer embedding rows than the target when both share one tokenizer:
model families pad their vocabularies per size (Qwen2.5 up to 7B: 151,936 rows, 14B and up:
152,064, for the same 151,665 tokens). It proposes only ids it has rows for
(its probabilities are zero beyond them), and a target token past its rows reaches it as
id 0, which only makes its guesses after that token worse: the target verifies every one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loragate.kernels.spec_sampling import sampling_probs

from ..errors import ModelConfigError
from ..kv_cache import KVCacheManager
from ..kv_layout import context_limit_of_cache, kv_layout
from ..model_runner import ModelRunner
from ..models.loader import load_model
from ..request import Request
from ..sampling_params import SamplingParams
from .draft_head import DraftHead
from .proposer import Proposal


def check_same_vocabulary(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int, name: str) -> None:
    """Speculation compares token ids, so both models must mean the same thing by each id; the
    draft may have fewer rows (padding differs across a family's sizes), not more, since the
    target could not verify ids past its own."""
    if draft_vocab > target_vocab:
        raise ModelConfigError(f"draft model {name} has a vocabulary of {draft_vocab} tokens, more than the "
                               f"target's {target_vocab}: speculative decoding needs the target's tokenizer")
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ModelConfigError(f"draft model {name} uses a different tokenizer than the target (token ids "
                               "differ): speculative decoding needs the same tokenizer")


class DraftModelProposer:
    wants_hidden_states = False

    def __init__(self, model_dir: Path, dtype: torch.dtype, max_model_len: int, num_blocks: int, block_size: int,
                 max_tokens_per_forward: int, head_size: int = 0, int4: bool = False,
                 device: torch.device | str = "cpu", cuda_graph_rows: int = 0, target_vocab: int | None = None):
        self.model, _ = load_model(model_dir, dtype, max_model_len, int4=int4, device=device)
        self.rows = self.model.config.vocab_size  # ids the draft can embed and propose
        self.head = DraftHead(self.model, head_size, int4, target_vocab or self.rows)
        c = self.model.config
        layout = kv_layout(c.layer_windows, c.num_layers, max_model_len)  # windowed layers give back blocks
        self.runner = ModelRunner(self.model, num_blocks, block_size, cuda_graph_rows=cuda_graph_rows, layout=layout)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True, layout=layout)
        # The longest context the draft's cache can ever hold (None: any)
        self.context_limit = context_limit_of_cache(num_blocks, block_size, layout, max_tokens_per_forward)
        self.max_tokens_per_forward = max_tokens_per_forward
        self.shadows: dict[str, Request] = {}
        self._synced: dict[str, int] = {}  # request id -> target length at the last sync
        # A draft about a third of the target's size costs about a third of a decode step per
        # drafted token (both are memory-bound at small batches).
        self.cost_per_token = 0.3
        self.last_round_seconds: float | None = None
        self.within_grammar = True  # structured requests draft under their format's mask (False: bench baseline)

    def forget(self, keep: set[str]) -> None:
        for rid in [r for r in self.shadows if r not in keep]:
            self.kv.free(self.shadows.pop(rid))
            self._synced.pop(rid, None)
            self.head.forget(rid)

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int],
                hidden_states: dict[str, torch.Tensor] | None = None) -> list[Proposal]:
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        # First forward: catch each shadow up with its target (within the token budget).
        step: list[tuple[int, Request, int]] = []
        budget = self.max_tokens_per_forward
        for i, req in enumerate(requests):
            shadow = self._sync(req)
            behind = shadow.num_tokens - shadow.num_computed_tokens
            if budget <= 0:
                break
            num_new = min(behind, budget)
            if not self.kv.allocate(shadow, num_new):  # draft cache full: this one does not speculate now
                if self.context_limit is None or shadow.num_tokens <= self.context_limit:
                    self.forget(set(self.shadows) - {req.request_id})  # room for it next time
                continue  # (a context the whole cache cannot hold is never drafted for; the others keep theirs)
            budget -= num_new
            step.append((i, shadow, num_new))
        self.last_round_seconds = None  # mean time of the rounds after the catch-up, if any ran
        round_times = []
        try:
            for round_no in range(max(num_tokens, default=0)):
                if not step:
                    break
                t0 = time.perf_counter()
                logits = self._forward(step)
                nxt = []
                for (i, shadow, _), row in zip(step, logits):
                    if shadow.num_computed_tokens < shadow.num_tokens:  # still catching up a long prompt
                        continue
                    grammar = requests[i].grammar if self.within_grammar else None
                    if grammar is not None and not grammar.mask_draft_logits(row):
                        continue
                    token, q = self._draw(requests[i], row)
                    drafts[i].append(token)
                    if q is not None:
                        probs[i].append(q)
                    shadow.output_token_ids.append(token)
                    if grammar is not None and not grammar.draft(token):
                        continue
                    if len(drafts[i]) < num_tokens[i] and self.kv.allocate(shadow, 1):
                        nxt.append((i, shadow, 1))
                if round_no > 0:
                    round_times.append(time.perf_counter() - t0)
                step = nxt
        finally:
            for req in requests:
                if req.grammar is not None:
                    req.grammar.undo_drafts()
        if round_times:
            self.last_round_seconds = sum(round_times) / len(round_times)
        return [Proposal(d, torch.stack(p) if p else None) for d, p in zip(drafts, probs)]

    def _valid_prefix(self, target: list[int], shadow: Request) -> int:
        """How much of the shadow's computed K/V holds the target's tokens: what the draft
        computed (its own drafts included) up to where it differs from what was accepted."""
        seen = shadow.all_token_ids
        valid = self._synced[shadow.request_id]
        limit = min(len(seen), len(target), shadow.num_computed_tokens)
        while valid < limit and seen[valid] == target[valid]:
            valid += 1
        return min(valid, shadow.num_computed_tokens)

    def _sync(self, req: Request) -> Request:
        target = req.all_token_ids
        if self.rows < self.head.vocab and max(target) >= self.rows:  # ids only the target has rows for
            target = [t if t < self.rows else 0 for t in target]
        shadow = self.shadows.get(req.request_id)
        if shadow is None:
            shadow = Request(req.request_id, list(target), SamplingParams(max_tokens=1))
            shadow.num_computed_tokens = self.kv.match_prefix(shadow)
            self.kv.release_out_of_window(shadow)
            self.shadows[req.request_id] = shadow
            self._synced[req.request_id] = len(target)
            self.head.add_tokens(req.request_id, target)
            return shadow
        self.head.add_tokens(req.request_id, target[self._synced[req.request_id]:])
        valid = self._valid_prefix(target, shadow)
        self.kv.truncate(shadow, valid)
        shadow.num_computed_tokens = valid
        # Here, where the shadow was cut back to what the target accepted: its next query is at
        # num_computed_tokens (not so after a round, whose drafts may yet be rolled back).
        self.kv.release_out_of_window(shadow)
        shadow.prompt_token_ids = list(target)
        shadow.output_token_ids = []
        self._synced[req.request_id] = len(target)
        return shadow

    def _forward(self, step: list[tuple[int, Request, int]]) -> torch.Tensor:
        """One draft forward; returns the logits at each shadow's newest computed position."""
        scheduled = [(shadow, n) for _, shadow, n in step]
        _, hidden = self.runner.forward(scheduled)
        ends, pos = [], 0
        for _, n in scheduled:
            pos += n
            ends.append(pos - 1)
        for shadow, n in scheduled:
            shadow.num_computed_tokens += n
            # Only blocks of verified tokens enter the prefix cache: a block holding drafts
            # may be partly rolled back and rewritten, which must never touch a shared block.
            if shadow.num_computed_tokens <= shadow.num_prompt_tokens:
                self.kv.cache_full_blocks(shadow)
        rows = hidden.index_select(0, torch.tensor(ends, device=hidden.device))
        return self.head.logits(rows, [s.request_id for s, _ in scheduled])

    @staticmethod
    def _draw(req: Request, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        p = req.sampling_params
        if p.is_greedy:
            return int(logits.argmax()), None
        q = sampling_probs(logits.unsqueeze(0), p.temperature, p.top_k, p.top_p, p.min_p)[0]
        return int(torch.multinomial(q, 1, generator=req.generator)), q
