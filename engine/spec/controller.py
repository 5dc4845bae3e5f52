"""When speculation pays, and how much: per-request k from its recent acceptance, and a
per-batch-size switch between speculative and plain decoding from measured throughput.

Per request: with per-token acceptance rate a, the i-th proposed token is used with
probability a**i, so proposing it pays while a**i exceeds the proposer's relative cost per
token. A request whose k drops to 0 is re-probed with k=1 every few steps.

Per batch: whether a step is cheaper with speculation depends on the batch size (verifying
k+1 positions per request turns memory-bound decode compute-bound as the batch grows) and
on the acceptance of the requests in it. So the controller measures tokens per second of
pure-decode steps in both modes, bucketed by batch size, and uses the faster one, spending
one step in EXPLORE_EVERY on the other mode to keep both estimates fresh. That is what keeps
speculation from ever making a busy server slower for long.
"""

from __future__ import annotations

import math

from ..request import Request

EXPLORE_EVERY = 16
REPROBE_EVERY = 8
_DECAY = 0.7  # weight of the old estimate in the acceptance and throughput averages
_MIN_SAMPLES = 2


def _bucket(batch_size: int) -> int:
    return max(batch_size, 1).bit_length()  # 1, 2-3, 4-7, 8-15, ...


class SpecController:
    def __init__(self, max_k: int):
        self.max_k = max_k
        self.rate: dict[tuple[int, bool], float] = {}  # (bucket, speculative) -> tokens/s
        self.samples: dict[tuple[int, bool], int] = {}
        self.steps: dict[int, int] = {}

    # -- per request ----------------------------------------------------------------------

    def num_tokens_for(self, req: Request, cost_per_token: float) -> int:
        a = req.spec_acceptance
        if a >= 0.999:
            k = self.max_k
        elif a <= cost_per_token:
            k = 0
        else:
            k = min(self.max_k, int(math.log(cost_per_token) / math.log(a)))
        if k == 0:
            req.spec_idle_steps += 1
            if req.spec_idle_steps >= REPROBE_EVERY:
                req.spec_idle_steps = 0
                return 1
        return k

    @staticmethod
    def record_acceptance(req: Request, proposed: int, accepted: int) -> None:
        """Per-token acceptance: a chain that stopped early had accepted + 1 trials."""
        trials = accepted + (1 if accepted < proposed else 0)
        if trials:
            req.spec_acceptance = _DECAY * req.spec_acceptance + (1 - _DECAY) * accepted / trials

    # -- per batch ------------------------------------------------------------------------

    def use_speculation(self, batch_size: int) -> bool:
        b = _bucket(batch_size)
        n = self.steps[b] = self.steps.get(b, 0) + 1
        for mode in (True, False):  # measure both modes first
            if self.samples.get((b, mode), 0) < _MIN_SAMPLES:
                return mode
        best = self.rate[(b, True)] >= self.rate[(b, False)]
        return (not best) if n % EXPLORE_EVERY == 0 else best

    def record_step(self, batch_size: int, speculative: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        key = (_bucket(batch_size), speculative)
        rate = tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else _DECAY * old + (1 - _DECAY) * rate
        self.samples[key] = self.samples.get(key, 0) + 1
