"""How many tokens to propose, per request and per step, so that speculation pays.

A request's i-th proposed token is used with probability f * l**(i-1): f is its recent rate
of accepting a first proposal, l of accepting a later one after the one before it was
accepted (drafts are right in runs, so l is usually well above f). Each proposed token costs target compute (the verifying step computes one
more position) and each drafting round costs a proposer forward. On a CPU the target step
is memory-bound only up to a few dozen positions; beyond that it grows with every position,
so what pays at batch 1 (6 proposals) can make batch 8 slower.

A guard checks the model against reality: per batch size, the measured tokens per second
of speculative and of plain decode steps (proposer time included); while speculation
measures slower, steps decode plainly.

So every step the controller picks the proposal budget B that maximises expected tokens per
second: it hands out the B most likely-to-be-accepted proposal positions over all requests
(highest first), predicting the step time from a linear model t(n) = a + b*n of the
target's step time in computed positions (fitted from measured pure-decode steps, trusted up
to twice the largest step measured) plus the measured cost of a drafting round. B = 0 is
plain decoding, so a busy server stops speculating by itself. One step in EXPLORE_EVERY
runs plain to keep the model's low end measured (or, while the guard holds speculation
back, tries it: each such try that finds it still losing at that batch size doubles the
wait for the next, up to MAX_BACKOFF times, since a try pays for the draft catching up on
everything decoded plainly), and a request that gets no proposals for REPROBE_EVERY steps
is given one, so its acceptance estimate can recover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..request import Request

EXPLORE_EVERY = 32
MAX_BACKOFF = 16
REPROBE_EVERY = 8
_ACCEPT_DECAY = 0.8  # per verified chain: a request's estimates follow its last few chains
_PRIOR = (0.8, 2.0)  # optimistic start (rate, pseudo-trials): the first steps measure it
_FIT_DECAY = 0.97  # per observation, for the step-time model
_REALIZED_DECAY = 0.8
_MIN_SAMPLES = 3


def _prior() -> list[float]:
    return [_PRIOR[0] * _PRIOR[1], _PRIOR[1]]


@dataclass
class Acceptance:
    """Decayed (successes, trials) of a request's first proposals and of its later ones."""

    first: list[float] = field(default_factory=_prior)
    later: list[float] = field(default_factory=_prior)

    def marginal(self, j: int) -> float:
        """Probability that the j-th proposal (1-based) is accepted."""
        return self.first[0] / self.first[1] * (self.later[0] / self.later[1]) ** (j - 1)

    def update(self, proposed: int, accepted: int) -> None:
        for sums in (self.first, self.later):
            sums[0] *= _ACCEPT_DECAY
            sums[1] *= _ACCEPT_DECAY
        self.first[0] += accepted >= 1
        self.first[1] += 1
        if accepted >= 1:  # later positions reached: the accepted ones after the first, and the one that failed
            self.later[0] += accepted - 1
            self.later[1] += accepted - 1 + (accepted < proposed)


def acceptance_of(req: Request, source: int = 0) -> Acceptance:
    """The request's acceptance estimates for proposals from the speculator's proposer (source
    0) or its fallback (1)."""
    attr = "spec_fallback_acceptance" if source else "spec_acceptance"
    if getattr(req, attr) is None:
        setattr(req, attr, Acceptance())
    return getattr(req, attr)


class StepTimeModel:
    """t(n) ~ a + b*n by exponentially weighted least squares over (positions, seconds)."""

    def __init__(self, prior_slope_fraction: float = 0.02):
        self.sums = [0.0] * 5  # w, w*n, w*t, w*n^2, w*n*t
        self.prior = prior_slope_fraction  # slope as a fraction of the mean step, until n varies
        self.max_n = 0  # the most positions measured in one step: the fit is trusted up to twice that

    def add(self, n: int, seconds: float) -> None:
        self.max_n = max(self.max_n, n)
        s = [x * _FIT_DECAY for x in self.sums]
        s[0] += 1
        s[1] += n
        s[2] += seconds
        s[3] += n * n
        s[4] += n * seconds
        self.sums = s

    def predict(self, n: int) -> float | None:
        w, wn, wt, wnn, wnt = self.sums
        if w == 0:
            return None
        mean_n, mean_t = wn / w, wt / w
        var = wnn / w - mean_n ** 2
        slope = (wnt / w - mean_n * mean_t) / var if var > 0.25 else self.prior * mean_t
        return max(mean_t + max(slope, 0.0) * (n - mean_n), 1e-6)


class SpecController:
    def __init__(self, max_k: int, cost_per_token: float, source: int = 0):
        self.max_k = max_k
        self.source = source  # which of the speculator's proposers this one plans for
        self.step_time = StepTimeModel()
        self.round_seconds: float | None = None  # one proposer round (a draft forward)
        self.cost_per_token = cost_per_token  # proposer round cost in target steps, until measured
        self.num_steps = 0
        # Measured output tokens/s of pure-decode steps, proposer time included, per batch-size
        # bucket and mode: the guard against a step-time model that flatters speculation.
        self.realized: dict[tuple[int, bool], tuple[float, int]] = {}
        self.backoff: dict[int, int] = {}  # batch-size bucket -> explore every EXPLORE_EVERY * this steps
        self.plain_probe = False

    def plan(self, requests: list[Request], limits: list[int], batch_size: int) -> list[int]:
        """Proposal counts for `requests` (those allowed to speculate, each at most its
        limit) in a step decoding `batch_size` requests."""
        self.num_steps += 1
        ks = [0] * len(requests)
        base = self.step_time.predict(batch_size)
        if base is None:  # measure a plain step first
            return ks
        marginals = sorted(((acceptance_of(r, self.source).marginal(j), i)
                            for i, (r, lim) in enumerate(zip(requests, limits))
                            for j in range(1, min(lim, self.max_k) + 1)), reverse=True)
        loses = self._speculation_loses(batch_size)
        budget = 0 if loses else self._best_budget(marginals, batch_size, base, len(requests))
        if budget and self._samples(batch_size, False) < _MIN_SAMPLES:
            budget = 0  # the guard compares against measured plain steps of this batch size
        bucket = batch_size.bit_length()
        backoff = self.backoff.get(bucket, 1) if loses else 1
        if not loses:
            self.backoff.pop(bucket, None)
        self.plain_probe = False  # this step is meant to measure plain decoding
        if self.num_steps % (EXPLORE_EVERY * backoff) == 0:
            if loses:  # each try that finds speculation still losing here doubles the wait for the next
                self.backoff[bucket] = min(2 * backoff, MAX_BACKOFF)
            self.plain_probe = bool(budget)
            # Try the other side: a plain step, or two proposals per request (the second
            # round is timed clean of catch-up), so neither the step-time model nor the
            # round cost and the acceptances go stale.
            return ks if budget else [min(2, lim, self.max_k) for lim in limits]
        for _, i in marginals[:budget]:
            ks[i] += 1
        if not any(ks):  # a proposer round would cost more than it could bring
            return ks
        for i, r in enumerate(requests):  # re-probe, within rounds paid anyway, requests that get nothing
            if ks[i] == 0 and limits[i] > 0:
                r.spec_idle_steps += 1
                if r.spec_idle_steps >= REPROBE_EVERY:
                    r.spec_idle_steps, ks[i] = 0, 1
            else:
                r.spec_idle_steps = 0
        return ks

    def _best_budget(self, marginals, batch_size: int, base: float, num_requests: int) -> int:
        round_cost = self.round_seconds if self.round_seconds is not None else self.cost_per_token * base
        best_rate, best = batch_size / base, 0
        expected, rounds = float(batch_size), 0
        counts = [0] * num_requests
        # A straight line fitted to small steps flatters big ones (a CPU turns compute-bound):
        # grow the budget only to twice the largest step measured, so it is learnt gradually.
        trusted = max(1, 2 * self.step_time.max_n - batch_size)
        for b, (m, i) in enumerate(marginals[:trusted], 1):
            expected += m
            counts[i] += 1
            rounds = max(rounds, counts[i])
            rate = expected / (self.step_time.predict(batch_size + b) + rounds * round_cost)
            if rate > best_rate:
                best_rate, best = rate, b
        return best

    def record_step(self, num_positions: int, seconds: float) -> None:
        """A pure-decode target step (no prefill in it) and its time, proposer excluded."""
        if seconds > 0:
            self.step_time.add(num_positions, seconds)

    def record_realized(self, batch_size: int, speculative: bool, tokens: int, seconds: float) -> None:
        if seconds > 0:
            key = (batch_size.bit_length(), speculative)  # buckets 1, 2-3, 4-7, 8-15, ...
            old, n = self.realized.get(key, (tokens / seconds, 0))
            self.realized[key] = (_REALIZED_DECAY * old + (1 - _REALIZED_DECAY) * tokens / seconds, n + 1)

    def _samples(self, batch_size: int, speculative: bool) -> int:
        return self.realized.get((batch_size.bit_length(), speculative), (0.0, 0))[1]

    def _speculation_loses(self, batch_size: int) -> bool:
        b = batch_size.bit_length()
        if min(self._samples(batch_size, True), self._samples(batch_size, False)) < _MIN_SAMPLES:
            return False
        return self.realized[(b, True)][0] < self.realized[(b, False)][0]

    def record_round(self, seconds: float) -> None:
        """The time of one proposer round (a draft forward of one token per request)."""
        if seconds > 0:
            old = self.round_seconds
            self.round_seconds = seconds if old is None else 0.8 * old + 0.2 * seconds

    def record_acceptance(self, req: Request, proposed: int, accepted: int) -> None:
        acceptance_of(req, self.source).update(proposed, accepted)
