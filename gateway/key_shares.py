"""How much of the recent traffic each affinity key (tenant + adapter) carries, so the router
can give a hot adapter more than one engine.

Pure rendezvous affinity puts all of an adapter's requests on one engine. With skewed
popularity (a few adapters take most requests) that engine saturates while another idles,
and the load bound then spills the hot adapter request by request onto other engines, each
of which has to load it and evict something else. Instead, a key whose share of recent
requests is large gets the first k engines of its own preference order, k growing with the
share, and each request goes to the least loaded of them: the hot adapter stays resident on
a fixed few engines and absorbs the imbalance, while the long tail stays on one engine each.

Shares decay with a half-life, so a key that cools down goes back to one engine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

HALF_LIFE_S = 30.0
# A key gets one engine per this fraction of one engine's fair share (1 / engines) it carries:
# at 0.5, a key with a quarter of the traffic of a two-engine fleet gets both engines.
SHARE_PER_ENGINE = 0.5
MIN_REQUESTS = 32  # before this many requests the shares are noise: one engine per key
MAX_KEYS = 4096  # beyond it the least active half is forgotten


class KeyShares:
    def __init__(self, half_life_s: float = HALF_LIFE_S, clock: Callable[[], float] = time.monotonic):
        self._rate = math.log(2) / half_life_s
        self._clock = clock
        self._origin = clock()
        self._weight: dict[str, float] = {}
        self._total = 0.0
        self.requests = 0

    def record(self, key: str) -> float:
        """Count one request for key; returns the key's share of recent requests (0..1)."""
        # Each request weighs exp(rate * t): the ratios decay as they should without touching
        # every key; the origin moves forward before the weights could overflow.
        age = self._clock() - self._origin
        if age * self._rate > 500:
            scale = math.exp(-age * self._rate)
            self._weight = {k: w * scale for k, w in self._weight.items()}
            self._total *= scale
            self._origin += age
            age = 0.0
        w = math.exp(age * self._rate)
        self._weight[key] = self._weight.get(key, 0.0) + w
        self._total += w
        self.requests += 1
        share = self._weight[key] / self._total
        if len(self._weight) > MAX_KEYS:
            keep = sorted(self._weight.items(), key=lambda kv: kv[1], reverse=True)[: MAX_KEYS // 2]
            self._weight = dict(keep)
        return share

    def engines_for(self, key: str, num_engines: int) -> int:
        """Record a request for key; how many of its preferred engines it may use (1..num_engines)."""
        share = self.record(key)
        if self.requests < MIN_REQUESTS or num_engines <= 1:
            return 1
        return min(num_engines, 1 + int(share * num_engines / SHARE_PER_ENGINE))
