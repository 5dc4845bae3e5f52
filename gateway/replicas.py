"""The router's engines: membership (from discovery), health (periodic GET /readyz, immediate
ejection on a connection error), in-flight counts, and which engine gets a request.

Only healthy engines are chosen. A new engine starts out of rotation until its first health
check passes; an ejected one returns the same way. Everything here runs on the router's
event loop, so plain attributes need no lock."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

from .key_shares import KeyShares
from .prefix_index import PrefixIndex
from .rendezvous import choose_bounded, preference_order

log = logging.getLogger("loragate.router")

HEALTH_TIMEOUT_S = 5.0


@dataclass
class Replica:
    url: str
    is_healthy: bool = False
    in_flight: int = 0  # requests the router has open on it (response not yet fully relayed)
    # Requests running and waiting in the engine at its last health check: other routers' too.
    reported_load: int = 0
    last_error: str | None = None

    @property
    def load(self) -> int:
        """Open requests as far as this router knows: its own, or what the engine last
        reported if more (several routers share engines: Helm runs two)."""
        return max(self.in_flight, self.reported_load)


def _reported_load(response) -> int:
    """running + waiting from an engine's /readyz (0 from one that does not say)."""
    try:
        load = response.json().get("load") or {}
        return sum(v for v in (load.get("running"), load.get("waiting")) if isinstance(v, int) and v >= 0)
    except (ValueError, AttributeError):
        return 0


@dataclass(frozen=True)
class Choice:
    replica: Replica
    is_spill: bool  # outside the adapter's engines (its first k preferences), which were at max_engine_load
    for_prefix: bool = False  # where the prompt's start ran last, rather than the least loaded of the adapter's engines


class ReplicaPool:
    def __init__(self, metrics_factory=None, *, policy: str = "affinity", max_load: int = 32,
                 prefix_routing: bool = True):
        self.policy, self.max_load = policy, max_load
        # Among a hot adapter's engines, a request goes where its prompt's start was last run
        # (its prefix cache) while that engine has at most this many more open than the least loaded.
        self.prefixes = PrefixIndex() if prefix_routing else None
        self.prefix_slack = max(2, max_load // 4)
        self._replicas: dict[str, Replica] = {}
        self._round_robin = itertools.count()
        self.shares = KeyShares()
        self.metrics = metrics_factory(self) if metrics_factory else None

    # -- membership ------------------------------------------------------------------------

    def all(self) -> list[Replica]:
        return [self._replicas[u] for u in sorted(self._replicas)]

    def healthy(self) -> list[Replica]:
        return [r for r in self.all() if r.is_healthy]

    def update(self, urls: list[str]) -> list[Replica]:
        """Make the members exactly `urls`; returns the new ones (not yet in rotation). Requests
        open on a dropped engine finish normally: they hold their Replica object."""
        wanted = set(urls)
        for url in [u for u in self._replicas if u not in wanted]:
            log.warning("engine %s left discovery; dropped", url)
            del self._replicas[url]
        added = []
        for url in urls:
            if url not in self._replicas:
                self._replicas[url] = replica = Replica(url)
                added.append(replica)
                log.info("engine %s discovered", url)
        return added

    # -- health ----------------------------------------------------------------------------

    def eject(self, replica: Replica, reason: str) -> None:
        if replica.is_healthy:
            log.warning("engine %s ejected: %s", replica.url, reason)
            if self.metrics is not None:
                self.metrics.ejections.labels(replica.url).inc()
        replica.is_healthy, replica.last_error = False, reason

    def admit(self, replica: Replica) -> None:
        if not replica.is_healthy:
            log.warning("engine %s is ready: in rotation", replica.url)
        replica.is_healthy, replica.last_error = True, None

    async def check(self, client, replica: Replica) -> None:
        """One GET /readyz: 200 puts the engine in rotation, anything else takes it out."""
        try:
            response = await client.get(replica.url + "/readyz", timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to answer is a failed check
            reason = f"health check failed: {type(e).__name__}: {e}"
        else:
            if response.status_code == 200:
                if replica.url in self._replicas:  # not dropped while the check was in flight
                    self.admit(replica)
                    replica.reported_load = _reported_load(response)
                return
            reason = f"health check answered {response.status_code}"
        self.eject(replica, reason)

    async def check_all(self, client) -> None:
        await asyncio.gather(*(self.check(client, r) for r in self.all()))

    # -- choice ----------------------------------------------------------------------------

    def choose(self, key: str, exclude: set[str] = frozenset(), prefix: list[bytes] = ()) -> Choice | None:
        """The engine for a request whose affinity key is `key` and whose prompt's chain hashes
        (prefix_index.py) are `prefix`; None when none is healthy."""
        candidates = [r for r in self.healthy() if r.url not in exclude]
        if not candidates:
            return None
        by_url = {r.url: r for r in candidates}
        if self.policy == "round_robin":
            return Choice(candidates[next(self._round_robin) % len(candidates)], False)
        # The preference order is over every healthy engine, excluded ones included, so a retry
        # goes to the key's second choice, where it would have spilled anyway.
        order = [u for u in preference_order(key, [r.url for r in self.healthy()]) if u in by_url]
        load = lambda u: by_url[u].load  # noqa: E731
        # A hot key spreads over its first k engines, least loaded first (see key_shares.py);
        # a retry (exclude given) is not a new request for the shares.
        k = self.shares.engines_for(key, len(order)) if not exclude else 1
        own = order[:k]
        url = min(own, key=load)  # min keeps the first of equals: preference order
        prefix = prefix if self.prefixes is not None else ()
        cached = self.prefixes.best(prefix, set(own)) if prefix and len(own) > 1 else None
        # where the prompt's start is cached, unless that engine is well behind the least loaded
        if cached is not None and load(cached) <= load(url) + self.prefix_slack:
            url = cached
        else:
            cached = None
        if load(url) >= self.max_load:
            url, cached = choose_bounded(order, load, self.max_load), None
        if prefix:
            self.prefixes.record(prefix, url)
        return Choice(by_url[url], url not in own, cached is not None)

    def first_healthy(self, exclude: set[str] = frozenset()) -> Replica | None:
        return next((r for r in self.healthy() if r.url not in exclude), None)

    def acquire(self, replica: Replica) -> None:
        replica.in_flight += 1

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
