"""Per-request generation settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError

POOLINGS = ("last", "first", "mean", "max")  # SamplingParams.pooling (engine/pooling.py)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0  # keep tokens at least this fraction as likely as the top one; 0 disables
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of most likely tokens (besides the chosen one) to report per step; None = off.
    logprobs: int | None = None
    # Logprobs of the prompt's own tokens (each given the ones before it), with this many
    # most likely alternatives per position; None = off. Such a prompt is computed whole:
    # cached prefix blocks have no logits to report.
    prompt_logprobs: int | None = None
    # Speculative decoding for this request when the engine has it on (False: opt out).
    speculative: bool = True
    # Logits adjustments (engine/logits_processors.py), OpenAI's and vLLM's meanings:
    # presence/frequency penalties count the output tokens, the repetition penalty (HF's
    # rule) every token seen; logit_bias maps token id -> added bias; the first min_tokens
    # tokens are never EOS, a stop token, or cut by a stop string.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    # vLLM's: sample only among these token ids (None: all); never generate these words (a
    # single-token word is banned outright, a longer one's last token after the rest of it,
    # as HF's bad_words_ids does).
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    # The text: with the stop string that ended it, and with special tokens decoded.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: an llguidance grammar the output must match, e.g. from
    # structured_output.grammar_from_json_schema(schema); the request ends when it is complete.
    grammar: str | None = None
    # Predicted output (OpenAI's `prediction`): text, or token ids, the output is expected to
    # be much like (a file with a small edit). Its tokens are verified as proposals, so the
    # output is what it would be without it, only sooner (engine/own_proposals.py).
    prediction: str | list[int] | None = None
    # An embedding of the prompt instead of text (engine/pooling.py): "last" (the last prompt
    # token's final hidden state), "first" (the first's: CLS pooling), or "mean" or "max" over
    # every prompt token. The request runs as a one-token generation whose token is dropped;
    # RequestOutput.embedding holds the vector.
    pooling: str | None = None
    # Scheduling (vLLM's convention): a lower value is admitted first, and when the KV cache is
    # full a request preempts a running one with a higher value rather than waiting for it.
    priority: int = 0
    # The output may open with a reasoning section (`<think> ... </think>`, engine/reasoning.py):
    # a grammar then applies to what follows it. No effect on a model without the markers.
    reasoning: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        # torch seeds a generator with 64 bits; the API's seeds are int64, plus the choice index
        if self.seed is not None and not (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be a 64-bit integer, got {self.seed!r}", "seed")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}", "top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}", "logprobs")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be non-empty strings", "stop")
        if len(self.stop) > 16:
            raise InvalidRequestError("at most 16 stop strings are supported", "stop")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be token ids (integers >= 0)", "stop_token_ids")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                                      "repetition_penalty")
        self.logit_bias = dict(self.logit_bias)
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}", "logit_bias")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(f"logit_bias values must be numbers in [-100, 100], got {bias!r}", "logit_bias")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or any(not isinstance(t, int) or isinstance(t, bool) or t < 0
                                                 for t in self.allowed_token_ids):
                raise InvalidRequestError("allowed_token_ids must be a non-empty list of token ids (integers >= 0)",
                                          "allowed_token_ids")
        self.bad_words = list(self.bad_words)
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise InvalidRequestError("bad_words must be non-empty strings", "bad_words")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                      "min_tokens")
        if self.prediction is not None and not (isinstance(self.prediction, str) or (
                isinstance(self.prediction, list)
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prediction))):
            raise InvalidRequestError("prediction must be text or a list of token ids", "prediction")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {self.priority!r}", "priority")
        if self.pooling not in (None, *POOLINGS):
            raise InvalidRequestError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}", "pooling")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidRequestError("grammar must be a string (an llguidance grammar)", "response_format")
        if self.grammar is not None and (self.allowed_token_ids is not None or self.bad_words):
            raise InvalidRequestError("allowed_token_ids and bad_words cannot be combined with a structured output "
                                      "format: the format decides which tokens may come", "allowed_token_ids")
        if self.grammar is not None and self.min_tokens:
            raise InvalidRequestError("min_tokens cannot be combined with a structured output format: the format "
                                      "decides where the output ends", "min_tokens")

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling must adjust this request's logits first (a slower path)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.allowed_token_ids is not None or self.bad_words)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
