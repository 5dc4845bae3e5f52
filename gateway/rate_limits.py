"""Per-tenant rate limits: requests and tokens per minute (OpenAI's RPM and TPM).

Each limit is a bucket per tenant that holds up to a minute's allowance and refills
continuously (the limit / 60 every second). An interactive request (chat, completions,
responses) is admitted while the tenant's buckets hold a request and a token: it takes the request, and
its tokens are taken as they are counted, the prompt's when it is queued and the output's as
it is generated. So a request the limit admitted is never cut short by it; the token bucket
goes below zero by what the latest requests used, and the tenant's next requests wait (429
with Retry-After) until it is back above zero. Over a span of t minutes a tenant uses at
most (t + 1) x the limit, plus what its open requests generate (max_tenant_requests bounds those).

Batch lines are exempt: they run in the engine's spare capacity, behind interactive traffic
(batch_runner.py), as OpenAI keeps batch limits apart from a key's rate limits. Limits hold
per server process: behind a router, the router keeps them for the fleet (router_limits.py).
"""

from __future__ import annotations

import json
import math
import time

from loragate.engine.errors import ModelConfigError

from .errors import APIError

KINDS = ("requests", "tokens")


class TenantRateLimits:
    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock=time.monotonic,
                 per_tenant: dict[str, dict[str, int]] | None = None):
        """per_tenant: tenant -> {"requests": n, "tokens": n}, its own limits where they differ
        from everyone's (a paid plan, an internal batch tenant); 0: no limit."""
        self.default_limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}  # 0: no limit
        self.per_tenant = per_tenant or {}
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (tenant, kind) -> (level, when)
        self.refused: dict[tuple[str, str], int] = {}  # (tenant, kind) -> requests refused (/metrics)

    def limit(self, tenant: str, kind: str) -> int:
        return self.per_tenant.get(tenant, {}).get(kind, self.default_limits[kind])

    def _level(self, tenant: str, kind: str) -> float:
        limit, now = self.limit(tenant, kind), self.clock()
        level, when = self._buckets.get((tenant, kind), (limit, now))
        level = min(limit, level + (now - when) * limit / 60)
        self._buckets[tenant, kind] = (level, now)
        return level

    def admit(self, tenant: str) -> None:
        """Take one request from `tenant`'s allowance, or raise a 429 saying when to retry."""
        self.refuse_if_empty(tenant, self.levels(tenant))
        self.take(tenant, "requests", 1)

    def levels(self, tenant: str) -> dict[str, float]:
        """The level of each limit that is set for `tenant`, refilled to now."""
        return {kind: self._level(tenant, kind) for kind in KINDS if self.limit(tenant, kind)}

    def refuse_if_empty(self, tenant: str, levels: dict[str, float]) -> None:
        """A 429 saying when to retry if a bucket (`levels`, as levels() gives them) holds less
        than one request or token."""
        for kind, level in levels.items():
            if level < 1:
                limit = self.limit(tenant, kind)
                self.refused[tenant, kind] = self.refused.get((tenant, kind), 0) + 1
                wait = (1 - level) * 60 / limit
                raise APIError(429, f"tenant {tenant!r} is over its limit of {limit} {kind} per minute; "
                               f"retry in {wait:.1f} s", "rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000)),
                                        **self.headers(tenant, levels)})

    def headers(self, tenant: str, levels: dict[str, float] | None = None) -> dict[str, str]:
        """OpenAI's x-ratelimit-limit-* and x-ratelimit-remaining-* for each limit that is set,
        as a response reports them (what is left after its admission); `levels`: the buckets'
        (default: this process's)."""
        out = {}
        for kind, level in (self.levels(tenant) if levels is None else levels).items():
            out[f"x-ratelimit-limit-{kind}"] = str(self.limit(tenant, kind))
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
        return out

    def refused_metric(self):
        """The Prometheus gauge family of self.refused, for a collector (engine or router)."""
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("loragate_rate_limited_requests", "requests refused (429) for a tenant's rate "
                                   "limit, by tenant and limit (requests, tokens), since start", labels=["tenant", "limit"])
        for (tenant, kind), count in sorted(self.refused.items()):
            family.add_metric([tenant, kind], count)
        return family

    def take(self, tenant: str, kind: str, amount: int) -> None:
        if self.limit(tenant, kind) and amount:
            level = self._level(tenant, kind)
            self._buckets[tenant, kind] = (level - amount, self._buckets[tenant, kind][1])


def load_tenant_limits(path: str) -> dict[str, dict[str, int]]:
    """A JSON file of per-tenant limits, {"tenant-a": {"requests_per_minute": 600,
    "tokens_per_minute": 200000}, ...}, either key optional -> TenantRateLimits.per_tenant."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"tenant rate limits {path}: {e}") from None
    if not isinstance(entries, dict):
        raise ModelConfigError(f"tenant rate limits {path}: must be a JSON object of tenant -> limits")
    out = {}
    for tenant, limits in entries.items():
        keys = {f"{kind}_per_minute": kind for kind in KINDS}
        if not isinstance(limits, dict) or not limits or set(limits) - set(keys) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in limits.values()):
            raise ModelConfigError(f"tenant rate limits {path}: {tenant!r} needs requests_per_minute and/or "
                                   f"tokens_per_minute, integers >= 0 (0: no limit), got {limits!r}")
        out[tenant] = {keys[k]: v for k, v in limits.items()}
    return out
