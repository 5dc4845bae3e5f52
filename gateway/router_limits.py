"""Tenants' rate limits kept by the router, for the whole fleet behind it.

An engine keeps the limits of the requests it serves, so behind a router a tenant whose
requests reach three engines would get three times its allowance (and one whose adapter has
one engine, once). The router sees every request: given the tenants' keys and limits (the
same settings an engine takes), it admits a request against the tenant's buckets before
routing it, and takes its tokens as the engine reports them (gateway/charges.py). A key the
router does not know is not limited here: the engine answers it 401. The engines behind such
a router need no limits of their own.

With several routers (Helm's router.replicas), each keeps its own buckets, so a tenant gets
up to that many times its limits: still a fixed factor, not one that grows with the engines."""

from __future__ import annotations

from loragate.engine.errors import ModelConfigError

from .auth import KeyStore
from .charges import CHARGE_HEADER
from .errors import APIError
from .rate_limits import TenantRateLimits


class FleetRateLimits:
    def __init__(self, keys: KeyStore, limits: TenantRateLimits):
        self.keys, self.limits = keys, limits

    @classmethod
    def from_settings(cls, settings) -> FleetRateLimits | None:
        """None when no limit is set, default or per tenant."""
        per_tenant = settings.tenant_limits()
        if not (settings.tenant_requests_per_minute or settings.tenant_tokens_per_minute or per_tenant):
            return None
        try:
            keys = KeyStore.from_sources(settings.api_keys_file, settings.api_keys, settings.admin_key)
        except (ValueError, OSError) as e:
            raise ModelConfigError(f"API keys: {e}") from e
        return cls(keys, TenantRateLimits(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute,
                                          per_tenant=per_tenant))

    def admit(self, authorization: str | None) -> str | None:
        """The caller's tenant, its request taken from its allowance (a 429 beyond it), or
        None for a caller without a valid key."""
        try:
            tenant = self.keys.authenticate(authorization).tenant
        except APIError:
            return None
        self.limits.admit(tenant)
        return tenant

    def charge(self, tenant: str, tokens: int) -> None:
        self.limits.take(tenant, "tokens", tokens)

    def response_headers(self, tenant: str, upstream, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`raw`, the engine's response headers for the client, with the engine's rate-limit
        headers replaced by the router's, which are the ones that hold; the charge the engine
        reported in its headers is taken first."""
        self.charge(tenant, int(upstream.headers.get(CHARGE_HEADER) or 0))
        out = [(k, v) for k, v in raw if not k.lower().startswith(b"x-ratelimit-")]
        return out + [(k.encode(), v.encode()) for k, v in self.limits.headers(tenant).items()]
