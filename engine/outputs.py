"""What the engine reports per request and step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all output tokens so far
    new_token_ids: list[int]  # tokens added by this step
    text: str  # all output text so far (stop string excluded)
    delta_text: str  # text that became final in this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs: (logprob, {token: logprob}, rank) of prompt tokens 1..
    # (rank: vLLM's, 1 + the tokens likelier than it; complete from the first output on, since a
    # request samples only once its whole prompt has run).
    prompt_logprobs: list[tuple[float, dict[int, float], int]] | None = None
    queue_seconds: float = 0.0  # from arrival to first admission into the running batch
    num_preemptions: int = 0
    num_prediction_tokens: int = 0  # SamplingParams.prediction's, and of those the output took as proposed:
    num_accepted_prediction_tokens: int = 0
    # SamplingParams.pooling: the prompt's embedding, once finished (engine/pooling.py).
    embedding: list[float] | None = None
