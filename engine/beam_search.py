"""Beam search as Hugging Face transformers runs it (`generate(num_beams=k, do_sample=False)`),
over ordinary engine requests.

Each step asks the engine for the next token's distribution after every live beam: one request
per beam, for one token, reporting its most likely candidates' logprobs. Beams share their
prompt and most of their output, so the prefix cache serves all of each such request but its
last partial block, and the requests batch with whatever else the engine runs (vLLM runs its
beam search the same way). The search itself is transformers' (GenerationMixin._beam_search):

- the candidates are the (beam, token) pairs with the highest cumulative logprob, enough of
  them that beam_width stay live even if every beam's best tokens end it;
- a candidate that ends (a stop token, or the length limit) among the best beam_width becomes a
  finished hypothesis, scored cumulative logprob / generated tokens ** length_penalty; the best
  beam_width hypotheses are kept;
- the search stops when no live beam can beat the worst of beam_width finished ones
  (early_stopping False: judged at the current length; "never": at the longest possible one
  when length_penalty > 0), or at once when beam_width have finished (early_stopping True)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .errors import InvalidRequestError
from .outputs import RequestOutput
from .sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int = 4  # beams kept, and hypotheses returned (best first)
    max_tokens: int = 16
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    early_stopping: bool | str = False  # transformers' meanings: False, True or "never"
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)  # end a beam like EOS does
    priority: int = 0  # of the engine requests (SamplingParams.priority)
    logprobs: int | None = None  # each hypothesis token's logprob, with this many top alternatives

    def __post_init__(self) -> None:
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool) or not 1 <= self.beam_width <= 64:
            raise InvalidRequestError(f"beam_width must be an integer in [1, 64], got {self.beam_width!r}", "n")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        # bounded: a length to a larger power overflows a float (and ranks nothing more usefully)
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not -10.0 <= self.length_penalty <= 10.0:
            raise InvalidRequestError(f"length_penalty must be a number in [-10, 10], got {self.length_penalty!r}",
                                      "length_penalty")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidRequestError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}",
                                      "early_stopping")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be token ids (integers >= 0)", "stop_token_ids")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs!r}", "logprobs")


@dataclass
class BeamSequence:
    """One finished hypothesis."""

    token_ids: list[int]  # generated, with the stop token that ended it
    text: str  # of the tokens before the stop token, special tokens skipped
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty: what ranks the hypotheses
    finish_reason: str  # "stop" (a stop token) or "length"
    stop_reason: int | None  # a stop_token_ids token that ended it (EOS: None, as for other requests)
    # With BeamSearchParams.logprobs: per token (its logprob, {top alternative: logprob}), as
    # RequestOutput.new_logprobs has them; they sum to cum_logprob.
    logprobs: list[tuple[float, dict[int, float]]] | None = None


class BeamSearch:
    """The search's state between engine steps: `live` beams to extend, `advance` with their
    candidates, until `done`; then `results()`."""

    def __init__(self, params: BeamSearchParams, eos_token_ids, vocab_size: int):
        self.params = params
        self.stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        # transformers' count: with (1 + stop tokens) x beam_width candidates, beam_width of them
        # continue even when every beam's likeliest tokens all end it (more change nothing)
        self.num_candidates = min(max(2 * params.beam_width, (1 + len(self.stops)) * params.beam_width,
                                      params.logprobs or 0), vocab_size)
        # (tokens, cumulative logprob, logprob entries), best first
        self.live: list[tuple[list[int], float, list]] = [([], 0.0, [])]
        self.finished: list[tuple[float, tuple]] = []  # (score, a live beam's tuple), best first
        self.improvable = True
        self.done = False

    def advance(self, candidates: list[list[tuple[int, float]]]) -> None:
        """candidates[i]: the num_candidates likeliest (token, logprob) after live beam i."""
        p = self.params
        pool = sorted(((beam[1] + lp, i, token, lp) for i, beam in enumerate(self.live)
                       for token, lp in candidates[i]), key=lambda c: (-c[0], c[1], c[2]))[:self.num_candidates]
        length = len(self.live[0][0]) + 1  # tokens each candidate has generated
        ends = [token in self.stops or length >= p.max_tokens for _, _, token, _ in pool]
        top = p.logprobs or 0
        extended = [(self.live[i][0] + [token], total,
                     self.live[i][2] + [(lp, dict(candidates[i][:top]))] if p.logprobs is not None else [])
                    for total, i, token, lp in pool]
        # Only the best beam_width candidates may finish; the rest are there to keep beams live.
        new = [(beam[1] / length ** p.length_penalty, beam) for beam, end in zip(extended[:p.beam_width], ends) if end]
        self.finished = sorted(self.finished + new, key=lambda f: -f[0])[:p.beam_width]
        self.live = [beam for beam, end in zip(extended, ends) if not end][:p.beam_width]
        full = len(self.finished) == p.beam_width
        if full and self.live:
            best_length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else length
            best_possible = self.live[0][1] / best_length ** p.length_penalty
            self.improvable = best_possible > self.finished[-1][0]
        self.done = not self.live or not self.improvable or (full and p.early_stopping is True)

    def results(self, tokenizer) -> list[BeamSequence]:
        out = []
        for score, (tokens, total, entries) in self.finished:
            stopped = tokens[-1] in self.stops
            text = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
            out.append(BeamSequence(tokens, text, total, score, "stop" if stopped else "length",
                                    tokens[-1] if stopped and tokens[-1] in self.params.stop_token_ids else None,
                                    entries if self.params.logprobs is not None else None))
        return out

    def step_params(self) -> SamplingParams:
        """Each live beam's engine request: one token, with the candidates' logprobs."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, speculative=False, logprobs=0,
                                priority=self.params.priority)
        params.logprobs = self.num_candidates  # past the API's 20: the engine reports any number
        return params


def candidates_of(out: RequestOutput) -> list[tuple[int, float]]:
    """A finished step request's reported candidates, likeliest first."""
    if out.finish_reason == "abort" or not out.new_logprobs:
        raise RuntimeError(f"a beam search step ended without its candidates ({out.finish_reason})")
    return sorted(out.new_logprobs[0][1].items(), key=lambda kv: -kv[1])


def check_fits(prompt_len: int, params: BeamSearchParams, max_model_len: int) -> None:
    """The request error a whole search would meet at its last step, before it starts."""
    if prompt_len + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"this model's context is {max_model_len} tokens, but the request needs {prompt_len + params.max_tokens} "
            f"({prompt_len} in the prompt, max_tokens {params.max_tokens} in the completion): lower max_tokens or "
            "shorten the prompt", "max_tokens")


def start_beam_search(engine, prompt_ids: list[int], params: BeamSearchParams, *, adapter: str | None = None,
                      tenant: str | None = None, cache_salt: str = "") -> list["BeamStream"]:
    """Start one search on an AsyncEngine (in the running event loop); one stream per hypothesis
    it returns, best first, each yielding one final RequestOutput, as a request's stream would.
    Bad input raises here, before anything runs. Closing or cancelling any of the streams stops
    the search."""
    search = BeamSearch(params, engine.engine.eos_token_ids, engine.engine.model.config.vocab_size)
    check_fits(len(prompt_ids), params, engine.engine.max_model_len)
    engine.engine.make_request(prompt_ids, search.step_params(), adapter=adapter, tenant=tenant)  # validates only
    task = asyncio.ensure_future(_search(engine, search, prompt_ids, adapter, tenant, cache_salt))
    return [BeamStream(task, i, prompt_ids) for i in range(params.beam_width)]


class BeamStream:
    """Async iterator over one hypothesis of a running search: its one, final output."""

    def __init__(self, task: asyncio.Future, index: int, prompt_ids: list[int]):
        self.task, self.index, self.prompt_ids = task, index, prompt_ids
        self.done = False

    def __aiter__(self) -> "BeamStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        self.done = True
        results, first = await self.task  # a cancelled wait cancels the search
        seq = results[self.index]
        return RequestOutput(
            request_id=f"{first.request_id}-beam{self.index}", prompt_token_ids=self.prompt_ids,
            token_ids=seq.token_ids, new_token_ids=seq.token_ids, text=seq.text, delta_text=seq.text, finished=True,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, num_cached_tokens=first.num_cached_tokens,
            new_logprobs=seq.logprobs or [], queue_seconds=first.queue_seconds)

    def close(self) -> None:
        if not self.done:
            self.done = True
            if not self.task.done():
                try:  # safe from any thread, as a garbage collection may run elsewhere
                    self.task.get_loop().call_soon_threadsafe(self.task.cancel)
                except RuntimeError:  # the loop is closed: nothing runs the search any more
                    pass

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


async def _search(engine, search: BeamSearch, prompt_ids: list[int], adapter: str | None, tenant: str | None,
                  cache_salt: str) -> tuple[list[BeamSequence], RequestOutput]:
    """The hypotheses, best first, and the first step's output (its prompt-cache hits and queue
    time). Cancelled, it aborts the step in flight."""
    first = None
    while not search.done:
        steps = [(prompt_ids + tokens, search.step_params()) for tokens, *_ in search.live]
        streams = await engine.add_requests(steps, adapter=adapter, tenant=tenant, cache_salt=cache_salt)
        try:
            outs = [await _last(stream) for stream in streams]
        finally:
            for stream in streams:
                stream.close()
        first = first or outs[0]
        search.advance([candidates_of(out) for out in outs])
    return search.results(engine.tokenizer), first


async def _last(stream) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out
