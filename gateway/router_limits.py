"""Tenants' rate limits kept by the router, for the whole fleet behind it.

An engine keeps the limits of the requests it serves, so behind a router a tenant whose
requests reach three engines would get three times its allowance (and one whose adapter has
one engine, once). The router sees every request: given the tenants' keys and limits (the
same settings an engine takes), it admits a request against the tenant's buckets before
routing it, and takes its tokens as the engine reports them (gateway/charges.py). A key the
router does not know is not limited here: the engine answers it 401. The engines behind such
a router need no limits of their own.

With several routers (Helm's router.replicas), each keeps its own buckets, so a tenant gets
up to that many times its limits, unless they share them in Redis (--rate-limit-redis-url;
shared_buckets.py). A Redis that cannot be reached or answers an error is not a reason to
refuse requests: the router then uses its own buckets for that call, logs it (once a minute
at most) and counts it in loragate_router_rate_limit_store_errors."""

from __future__ import annotations

import asyncio
import logging
import time

from loragate.engine.errors import ModelConfigError

from .auth import KeyStore
from .charges import CHARGE_HEADER
from .errors import APIError
from .rate_limits import KINDS, TenantRateLimits
from .shared_buckets import RedisBuckets

log = logging.getLogger("loragate.router")


class FleetRateLimits:
    def __init__(self, keys: KeyStore, limits: TenantRateLimits, shared: RedisBuckets | None = None):
        """shared: the buckets every router uses (None: this router's own, `limits`)."""
        self.keys, self.limits, self.shared = keys, limits, shared
        self.store_errors = 0  # calls to `shared` that failed and fell back to `limits`
        self._last_warning = -1e9
        # Streams report tokens an event at a time: per tenant, one call to `shared` is in flight
        # and what is reported meanwhile goes in the next, so Redis sees few calls, not one a token.
        self._unsent: dict[str, int] = {}
        self._senders: dict[str, asyncio.Task] = {}

    @classmethod
    def from_settings(cls, settings) -> FleetRateLimits | None:
        """None when no limit is set, default or per tenant."""
        per_tenant = settings.tenant_limits()
        if not (settings.tenant_requests_per_minute or settings.tenant_tokens_per_minute or per_tenant):
            return None
        try:
            keys = KeyStore.from_sources(settings.api_keys_file, settings.key_entries(), settings.admin_key)
        except (ValueError, OSError) as e:
            raise ModelConfigError(f"API keys: {e}") from e
        shared = RedisBuckets(settings.rate_limit_redis_url) if settings.rate_limit_redis_url else None
        return cls(keys, TenantRateLimits(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute,
                                          per_tenant=per_tenant), shared)

    async def admit(self, authorization: str | None) -> str | None:
        """The caller's tenant, its request taken from its allowance (a 429 beyond it), or
        None for a caller without a valid key."""
        try:
            tenant = self.keys.authenticate(authorization).tenant
        except APIError:
            return None
        result = await self._shared(tenant, {"requests": 1}, check=True)
        if result is None:
            self.limits.admit(tenant)
        elif not result[0]:
            self.limits.refuse_if_empty(tenant, result[1])
        return tenant

    def charge(self, tenant: str, tokens: int) -> None:
        """Take `tokens` from the tenant's allowance (a stream's report: not awaited)."""
        if self.shared is None:
            self.limits.take(tenant, "tokens", tokens)
        elif tokens:
            self._unsent[tenant] = self._unsent.get(tenant, 0) + tokens
            if tenant not in self._senders:
                self._senders[tenant] = asyncio.get_running_loop().create_task(self._send_charges(tenant))

    async def _send_charges(self, tenant: str) -> None:
        try:
            while tokens := self._unsent.pop(tenant, 0):
                await self._shared(tenant, {"tokens": tokens}, check=False)
        finally:
            del self._senders[tenant]

    async def response_headers(self, tenant: str, upstream,
                               raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`raw`, the engine's response headers for the client, with the engine's rate-limit
        headers replaced by the router's, which are the ones that hold; the charge the engine
        reported in its headers is taken first."""
        tokens = int(upstream.headers.get(CHARGE_HEADER) or 0)
        result = await self._shared(tenant, {"tokens": tokens}, check=False)
        levels = None if result is None else result[1]
        out = [(k, v) for k, v in raw if not k.lower().startswith(b"x-ratelimit-")]
        return out + [(k.encode(), v.encode()) for k, v in self.limits.headers(tenant, levels).items()]

    async def _shared(self, tenant: str, takes: dict[str, int], check: bool) -> tuple[bool, dict] | None:
        """`shared.apply`; None where there is no shared store or it failed, after taking
        `takes` from this router's own buckets instead (an admission's request is left to
        the caller, which checks first)."""
        if self.shared is not None:
            try:
                return await self.shared.apply(tenant, {kind: self.limits.limit(tenant, kind) for kind in KINDS},
                                               takes, check)
            except Exception as e:  # noqa: BLE001 - any failure of the store: fall back, never refuse for it
                self.store_errors += 1
                if time.monotonic() - self._last_warning > 60:
                    self._last_warning = time.monotonic()
                    log.warning("rate-limit store unreachable (%s: %s); using this router's own buckets until it "
                                "answers", type(e).__name__, e)
        if not check:
            for kind, amount in takes.items():
                self.limits.take(tenant, kind, amount)
        return None

    async def close(self) -> None:
        await asyncio.gather(*self._senders.values(), return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
