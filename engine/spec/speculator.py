"""The Speculator: after each engine step it asks the proposer for tokens for the running
decode requests (how many: SpecController), and after the next step it learns from what the
target accepted. It also keeps the counters the gateway exports as metrics.

A draft model has an n-gram lookup fallback: in a step where drafting does not pay (a busy
batch, where draft forwards and verification turn compute-bound), the lookup, which costs no
forward, may still propose; each proposer has its own controller and acceptance estimates."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ModelConfigError
from ..request import Request
from .controller import SpecController
from .proposer import Proposer


@dataclass
class SpecStats:
    num_proposed: int = 0  # speculative tokens verified by the target
    num_accepted: int = 0
    num_verify_steps: int = 0  # request-steps that verified at least one proposed token
    num_emitted: int = 0  # tokens those request-steps emitted (accepted + the target's own)
    num_speculative_steps: int = 0  # engine steps decoded speculatively vs plainly
    num_plain_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step of a request (1 = nothing accepted)."""
        return self.num_emitted / self.num_verify_steps if self.num_verify_steps else 0.0


class Speculator:
    def __init__(self, proposer: Proposer, max_k: int, max_model_len: int, fallback: Proposer | None = None):
        self.proposer = proposer
        self.controller = SpecController(max_k, proposer.cost_per_token)
        self.fallback = fallback
        self.fallback_controller = SpecController(max_k, fallback.cost_per_token, source=1) if fallback else None
        self._controllers = [c for c in (self.controller, self.fallback_controller) if c is not None]
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self.cut_at_grammar = True  # proposals end before a token the request's format refuses (False: bench)
        # What the last propose() decided, for the step that verifies it.
        self._pending_batch = 0
        self._pending_controller: SpecController | None = None  # whose proposals the step verifies
        self._propose_seconds = 0.0  # what proposing for the coming step cost
        self._hidden_states: dict | None = None  # the last step's, for a proposer that wants them

    def propose(self, running: list[Request]) -> None:
        t_start = time.perf_counter()
        self._propose_seconds = 0.0
        self._pending_controller = None
        self.proposer.forget({r.request_id for r in running})
        decode = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        self._pending_batch = len(decode)
        limits = [self._limit(r) for r in decode]
        eligible = [(r, lim) for r, lim in zip(decode, limits) if lim > 0]
        if not eligible:
            return
        reqs = [r for r, _ in eligible]
        ks = self.controller.plan(reqs, [lim for _, lim in eligible], len(decode))
        proposer, controller = self.proposer, self.controller
        if not any(ks) and self.fallback is not None and not self.controller.plain_probe:
            proposer, controller = self.fallback, self.fallback_controller
            ks = controller.plan(reqs, [lim for _, lim in eligible], len(decode))
        chosen = [(r, k) for r, k in zip(reqs, ks) if k > 0]
        if not chosen:
            return
        self._pending_controller = controller
        t0 = time.perf_counter()
        proposals = proposer.propose([r for r, _ in chosen], [k for _, k in chosen], self._hidden_states)
        # A draft reports its rounds' time without the catch-up (the first round may prefill
        # a whole prompt); a proposer without rounds costs what the call took.
        if hasattr(proposer, "last_round_seconds"):
            if proposer.last_round_seconds is not None:
                controller.record_round(proposer.last_round_seconds)
        else:
            controller.record_round(time.perf_counter() - t0)
        for (r, _), proposal in zip(chosen, proposals):
            r.spec_token_ids, r.spec_draft_probs = proposal.token_ids, proposal.probs
            if r.grammar is not None and self.cut_at_grammar:  # verification would reject it: cut there
                valid = r.grammar.valid_prefix(r.spec_token_ids)
                if valid < len(r.spec_token_ids):
                    r.spec_token_ids = r.spec_token_ids[:valid]
                    r.spec_draft_probs = r.spec_draft_probs[:valid] if r.spec_draft_probs is not None else None
        self._propose_seconds = time.perf_counter() - t_start

    def _limit(self, r: Request) -> int:
        """Most tokens worth proposing: never past max_tokens or the context."""
        if not r.sampling_params.speculative:
            return 0
        return min(r.sampling_params.max_tokens - len(r.output_token_ids) - 1, self.max_model_len - r.num_tokens)

    def after_step(self, scheduled, out, proposed: list[int], seconds: float) -> None:
        """proposed: per out.requests, how many speculative tokens the step verified;
        seconds: the target step's time."""
        s = self.stats
        self._hidden_states = out.hidden_states
        source = self._pending_controller
        for req, p, accepted in zip(out.requests, proposed, out.num_accepted):
            if p:
                s.num_proposed += p
                s.num_accepted += accepted
                s.num_verify_steps += 1
                s.num_emitted += accepted + 1
                source.record_acceptance(req, p, accepted)
        speculative = any(proposed)
        if speculative:
            s.num_speculative_steps += 1
        else:
            s.num_plain_steps += 1
        batch_size = self._pending_batch
        pure_decode = (len(scheduled) == len(out.requests) == batch_size
                       and out.num_computed_tokens == batch_size + sum(proposed))
        if pure_decode:
            emitted = sum(a + 1 for a in out.num_accepted)
            for controller in self._controllers:
                controller.record_step(out.num_computed_tokens, seconds)
                if controller is source or not speculative:
                    controller.record_realized(batch_size, speculative, emitted, seconds + self._propose_seconds)


def build_speculator(config, engine) -> Speculator | None:
    """The speculator EngineConfig asks for, checked against the target; None when off."""
    if config.speculative == "off":
        return None
    from .ngram import NgramProposer

    lookup = NgramProposer(config.ngram_min, config.ngram_max)
    if config.speculative == "ngram":
        return Speculator(lookup, config.num_speculative_tokens, engine.max_model_len)
    return Speculator(_draft_proposer(config, engine), config.num_speculative_tokens, engine.max_model_len,
                      fallback=lookup)


def _draft_proposer(config, engine):
    from ..llm_engine import _load_tokenizer
    from ..models.arch import ModelArchConfig, text_config
    from ..models.loader import load_hf_config
    from ..models.prepare import resolve_model
    from .draft import DraftModelProposer, check_same_vocabulary

    draft_dir = resolve_model(config.draft_model)
    draft_config = load_hf_config(draft_dir)
    check_same_vocabulary(engine.tokenizer, _load_tokenizer(draft_dir), engine.model.config.vocab_size,
                          text_config(draft_config).vocab_size, config.draft_model)
    # A LongRoPE draft follows the target's rule on its own tables: past its original_max_position_embeddings
    # it takes the long factors at every position (rope_tables); its proposals are verified either way.
    draft_positions = ModelArchConfig.from_hf(draft_config).max_position_embeddings
    if draft_positions < engine.max_model_len:
        raise ModelConfigError(f"draft model {config.draft_model} handles {draft_positions} "
                               f"positions, fewer than max_model_len {engine.max_model_len}: lower --max-model-len")
    return DraftModelProposer(draft_dir, config.torch_dtype, engine.max_model_len, engine.kv.num_blocks,
                              config.block_size, config.max_num_batched_tokens, config.draft_vocab_size,
                              config.draft_quantization == "int4", device=engine.model.device,
                              cuda_graph_rows=config.cuda_graph_rows, target_vocab=engine.model.config.vocab_size)
