"""The one object that carries a generation request from the API down to the runner."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Key that separates prefix-cache entries of different weights (adapter id + version);
    # empty for the base model.
    cache_salt: str = ""
    # Who sent it: tenants take turns at admission (scheduler), and a tenant's prompts share
    # prefix-cache entries only with its own. None: the Python API's single user.
    tenant: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # LoRA: the adapter's name, its "name@version" key, and its weights (held here so a
    # request finishes on the version it started with even if the adapter is replaced).
    adapter: str | None = None
    lora_key: str | None = None
    lora_weights: object = field(default=None, repr=False)
    lora_slot: int = -1  # pool slot while running, -1 for the base model
    num_passed_over: int = 0  # scheduler steps that admitted others while this one waited

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (prompt and output tokens alike).
    num_computed_tokens: int = 0
    # Of those, how many came from the prefix cache on the first admission (usage's cached tokens).
    num_cached_tokens: int = 0
    # One block table per group of layers (engine/kv_layout.py); empty while it holds none.
    block_tables: list[list[int]] = field(default_factory=list)
    # Leading blocks of the windowed groups' tables given back because no query of this
    # request will see them again: those entries are KVCacheManager.released_block.
    num_released_blocks: int = 0
    # Leading full blocks already offered to the prefix cache (KVCacheManager.cache_full_blocks).
    num_registered_blocks: int = 0
    # Chained hashes of this request's full blocks, in order (prefix-cache keys).
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # first admission: arrival to it is queue time
    first_token_time: float | None = None
    stop_reason: str | int | None = None
    # Per output token: (chosen token logprob, {token id: logprob} of the top alternatives).
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    # With sampling_params.prompt_logprobs: the same, and each one's rank, for prompt tokens 1..
    # (token 0 has no context), filled as prefill chunks run.
    prompt_logprobs: list[tuple[float, dict[int, float], int]] = field(default_factory=list)
    # Speculative decoding: tokens proposed for the next step (verified by the target, not yet
    # part of the output), the distributions they were drawn from ([k, V], None for greedy or
    # deterministic proposers), and this request's recent acceptance (spec.controller.Acceptance).
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: torch.Tensor | None = field(default=None, repr=False)
    spec_acceptance: object = field(default=None, repr=False)
    spec_fallback_acceptance: object = field(default=None, repr=False)  # of the n-gram fallback's proposals
    spec_idle_steps: int = 0  # steps since it last speculated (re-probe a request set to k=0)
    # SamplingParams.prediction as token ids; where in it the output has got to (engine/
    # own_proposals.py), and how many of its tokens the output took as they were proposed.
    prediction_token_ids: list[int] | None = None
    prediction_cursor: int = 0
    prediction_synced_at: int = 0  # the output's length when the cursor last moved
    prediction_ngram_ends: dict | None = None  # own_proposals.ngram_ends, built at first use
    num_accepted_prediction_tokens: int = 0
    # Penalties, logit_bias, min_tokens (engine/logits_processors.LogitsAdjuster); None: none.
    logits_adjuster: object = field(default=None, repr=False)
    # Structured output (engine/structured_output.GrammarConstraint); None: unconstrained.
    grammar: object = field(default=None, repr=False)
    # SamplingParams.pooling: the prompt's pooled hidden states so far (engine/pooling.py).
    pooled: torch.Tensor | None = field(default=None, repr=False)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.sampling_params.seed
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    @property
    def block_ids(self) -> list[int]:
        """The first group's block table (the only one, but for models with windowed layers)."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def takes_prefix_hits(self) -> bool:
        """Whether cached blocks may stand in for computing its prompt: not where an
        embedding needs the hidden states of positions before the last (the cache keeps only
        K and V)."""
        return self.sampling_params.pooling in (None, "last")

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions still lack their logprobs (so none may come from the cache)."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None
