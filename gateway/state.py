"""Everything the HTTP handlers share: settings, keys, the engine (once loaded), the adapter
registry, and how a request's `model` turns into an engine adapter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass, field

from loragate.adapters.host_lru import DEFAULT_MAX_BYTES, HostLru
from loragate.engine.errors import AdapterNotFoundError

from .auth import KeyStore, Principal
from .charges import CHARGE_HEADER, charge_comment
from .errors import APIError
from .rate_limits import TenantRateLimits

log = logging.getLogger("loragate.gateway")


class TenantSlot:
    """Held while a tenant's request is open; released once, explicitly or (a response that
    never started streaming) when dropped. Its tokens go to the tenant's rate limit (charge)
    and, when a router asked (`report`), to the router too (gateway/charges.py)."""

    def __init__(self, counts: dict, tenant: str, rate_limits: TenantRateLimits, report: bool = False):
        self.counts, self.tenant, self.open = counts, tenant, True
        self.rate_limits, self.report = rate_limits, report
        self._unreported = 0

    def charge(self, tokens: int) -> None:
        self.rate_limits.take(self.tenant, "tokens", tokens)
        self._unreported += tokens

    def _take_unreported(self) -> int:
        tokens, self._unreported = self._unreported, 0
        return tokens

    def response_headers(self) -> dict[str, str]:
        """The tenant's rate limits and what is left of them, and the tokens charged so far
        when reporting: for the response's headers, built once."""
        headers = self.rate_limits.headers(self.tenant)
        if self.report:
            headers[CHARGE_HEADER] = str(self._take_unreported())
        return headers

    def reported(self, events):
        """A stream's SSE events, each led by a report of the tokens charged since the last
        when reporting."""
        return self._reporting(events) if self.report else events

    async def _reporting(self, events):
        async with contextlib.aclosing(events) as events:
            async for event in events:
                tokens = self._take_unreported()
                yield charge_comment(tokens) + event if tokens else event

    def release(self) -> None:
        if self.open:
            self.open = False
            self.counts[self.tenant] -= 1
            if not self.counts[self.tenant]:
                del self.counts[self.tenant]

    def __del__(self) -> None:
        self.release()


@dataclass
class ServerState:
    keys: KeyStore
    max_waiting: int = 256
    max_tenant_requests: int = 0  # 0: no per-tenant limit
    tenant_in_flight: dict = field(default_factory=dict)  # tenant -> open inference requests
    rate_limits: TenantRateLimits = field(default_factory=TenantRateLimits)  # none by default
    tenant_priorities: dict = field(default_factory=dict)  # tenant -> its most urgent priority (others: 0)
    tenant_uploads: dict = field(default_factory=dict)  # tenant -> asyncio.Lock held while it uploads an adapter
    engine: object | None = None  # AsyncEngine, set once the model is loaded
    registry: object | None = None  # adapters.registry.AdapterRegistry
    model_name: str = ""
    served_names: tuple[str, ...] = ()  # model_name and its aliases, as /v1/models lists them
    think_markers: object | None = None  # engine.reasoning.ThinkMarkers: chat answers split into reasoning and content
    base_names: set[str] = field(default_factory=set)
    # Whose adapters every tenant may use, as "<shared_tenant>/<name>" (None: no one's).
    shared_tenant: str | None = None
    per_request_metrics: bool = False  # answers carry their own timings ("metrics"), as vLLM's flag
    # /v1/embeddings: the pooling (None: the model's own) and whether vectors are normalized
    # unless a request says (GatewaySettings.pooler)
    pooler: tuple[str | None, bool] = (None, True)
    audit: object | None = None  # gateway.audit.AuditLog: adapter management is recorded there
    load_error: str | None = None
    metrics: object | None = None  # gateway.metrics.Metrics, set by build_app
    response_store: object | None = None  # gateway.response_store.ResponseStore, while the app runs
    response_retention_days: int = 30  # 0: responses are not stored
    # Adapters the engine holds (by versioned key), least recently used first. Bounded in count
    # and bytes (server.py sets EngineConfig.max_cpu_lora_memory): a request already running
    # keeps its weights, and a later one simply re-adds them.
    engine_adapters: HostLru = field(default_factory=lambda: HostLru(64, DEFAULT_MAX_BYTES, keep_newest=True))

    def require_engine(self):
        if self.engine is not None and self.engine.error is not None:
            raise APIError(503, f"the engine stopped after an internal error ({self.engine.error}); restart the server",
                           "server_error", code="engine_dead")
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error", code="not_ready")
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="not_ready",
                           headers={"Retry-After": "5"})
        return self.engine

    def check_capacity(self, tenant: str) -> None:
        """A full waiting queue refuses the tenants that fill it: one whose open requests are
        within its share of the queue (max_waiting over the tenants with requests open) still
        gets in, so one tenant's flood cannot lock the others out. Those shares add up to
        max_waiting, so the queue holds at most twice that."""
        if self.engine.num_waiting < self.max_waiting:
            return
        share = self.max_waiting / max(1, len(self.tenant_in_flight))
        # 0 open: not an interactive request (those are counted before they get here) but a
        # batch line, which never passes a full queue: batches yield to interactive traffic.
        if not 0 < self.tenant_in_flight.get(tenant, 0) <= share:
            raise APIError(429, f"too many requests waiting ({self.max_waiting}); retry shortly", "rate_limit_error",
                           code="overloaded", headers={"Retry-After": "1"})

    def open_tenant_request(self, tenant: str, headers=None) -> TenantSlot:
        """One open inference request of `tenant`: a 429 beyond max_tenant_requests, so one
        tenant's flood queues at its own door instead of ahead of everyone else's requests,
        and beyond its rate limits (rate_limits.py). `headers`: the request's (a router asks
        for the tokens charged in them, gateway/charges.py)."""
        open_now = self.tenant_in_flight.get(tenant, 0)
        if self.max_tenant_requests and open_now >= self.max_tenant_requests:
            raise APIError(429, f"tenant {tenant!r} has {open_now} requests open, its limit; retry when one finishes",
                           "rate_limit_error", code="tenant_limit", headers={"Retry-After": "1"})
        self.rate_limits.admit(tenant)
        self.tenant_in_flight[tenant] = open_now + 1
        report = headers is not None and headers.get(CHARGE_HEADER) == "1"
        return TenantSlot(self.tenant_in_flight, tenant, self.rate_limits, report)

    def priority_of(self, tenant: str, asked: int) -> int:
        """A request's scheduling priority: as asked, but never more urgent (lower) than its tenant's."""
        return max(self.tenant_priorities.get(tenant, 0), asked)

    async def resolve_model(self, principal: Principal, model: str) -> str | None:
        """None for the base model, else the engine's name for the caller's adapter."""
        if model in self.base_names:
            return None
        base, sep, name = model.partition(":")
        if sep and base in self.base_names:
            model = name
        if self.registry is None:
            raise AdapterNotFoundError(f"model {model!r} does not exist", "model")
        engine = self.engine.engine
        tenant, name, version = self.owner_of(principal.tenant, model)

        def fetch():  # off the event loop: disk or S3, then the engine's own work on the adapter
            info, weights = self.registry.weights(tenant, name, version)
            if info.key not in engine.adapters:
                engine.prepare_adapter_weights(weights)
            return info, weights

        try:
            info, weights = await asyncio.to_thread(fetch)
        except KeyError:  # AdapterNotFound: also for another tenant's adapter
            raise AdapterNotFoundError(f"model {model!r} does not exist", "model") from None
        if info.key not in engine.adapters:
            engine.add_adapter_weights(info.key, weights)
        for old, _ in self.engine_adapters.put(info.key, None, weights.num_bytes):
            engine.remove_adapter(old)
        return info.key

    def owner_of(self, tenant: str, model: str) -> tuple[str, str, int | None]:
        """(tenant, adapter name, version) a caller of `tenant` means by `model`: its own
        adapter, or "<shared tenant>/<name>", one every tenant may use; "...@N" pins version N,
        else the latest (adapter names have neither '/' nor '@')."""
        model, at, version = model.partition("@")
        owner, sep, name = model.partition("/")
        if (at and not re.fullmatch(r"[1-9][0-9]{0,8}", version)) or (sep and owner != self.shared_tenant):
            raise AdapterNotFoundError(f"model {model + at + version!r} does not exist", "model")
        if sep:
            tenant, model = owner, name
        return tenant, model, int(version) if at else None

    def on_adapter_change(self, info, adapter_id: str) -> None:
        """Registry listener: drop the engine's copies of replaced or deleted versions
        (requests running on them finish first: they hold the weights)."""
        if self.engine is None:
            return
        engine = self.engine.engine
        for name in [n for n in list(engine.adapters) if n.startswith(adapter_id + "@")]:
            if info is None or name != info.key:
                engine.remove_adapter(name)
                self.engine_adapters.pop(name, None)
