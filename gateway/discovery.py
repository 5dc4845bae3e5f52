"""Where the router's engines are: a static list of base URLs and/or every address a DNS name
resolves to (a Kubernetes headless Service answers with one A/AAAA record per ready pod).

The DNS name is re-resolved periodically by the router (`discovery_interval`); a failed
lookup keeps the previous answer, because a resolver hiccup must not empty a healthy fleet
(engines that really went away fail their health checks and are ejected anyway)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from loragate.engine.errors import ModelConfigError

log = logging.getLogger("loragate.router")

Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses


def parse_engine_urls(text: str | None) -> list[str]:
    """'http://a:8000, http://b:8000/' -> ['http://a:8000', 'http://b:8000'] (deduplicated,
    order kept); anything but an http(s) base URL with a host is refused."""
    urls: list[str] = []
    for item in (text or "").split(","):
        item = item.strip().rstrip("/")
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise ModelConfigError(f"engine_urls: {item!r} is not a base URL like http://10.0.0.5:8000")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ModelConfigError(f"engine_urls: {item!r} has an invalid port") from None
        if item not in urls:
            urls.append(item)
    return urls


def parse_dns_target(text: str | None) -> tuple[str, int] | None:
    """'engines.ns.svc.cluster.local:8000' -> ('engines.ns.svc.cluster.local', 8000)."""
    if not text:
        return None
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelConfigError(f"engine_dns: expected 'name:port' (e.g. loragate-engine:8000), got {text!r}")
    return host, int(port)


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every IPv4/IPv6 address of host (blocking: run it in a thread)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def address_url(address: str, port: int, scheme: str = "http") -> str:
    if ipaddress.ip_address(address.split("%", 1)[0]).version == 6:
        return f"{scheme}://[{address}]:{port}"
    return f"{scheme}://{address}:{port}"


class EngineDiscovery:
    """The current set of engine base URLs: the static ones plus the DNS name's addresses."""

    def __init__(self, static_urls: list[str], dns_target: tuple[str, int] | None,
                 resolver: Resolver = resolve_addresses):
        self.static_urls, self.dns_target, self.resolver = list(static_urls), dns_target, resolver
        self._resolved: list[str] = []  # the last successful DNS answer, as URLs

    @classmethod
    def from_settings(cls, settings, resolver: Resolver = resolve_addresses) -> EngineDiscovery:
        return cls(parse_engine_urls(settings.engine_urls), parse_dns_target(settings.engine_dns), resolver)

    def discover(self) -> list[str]:
        """Static URLs then resolved ones, without duplicates. Blocking (DNS): call it in a thread."""
        if self.dns_target is not None:
            host, port = self.dns_target
            try:
                addresses = self.resolver(host, port)
            except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
                log.warning("engine discovery: resolving %s:%d failed (%s); keeping %d known engines",
                            host, port, e, len(self._resolved))
            else:
                self._resolved = [address_url(a, port) for a in sorted(set(addresses))]
        return list(dict.fromkeys(self.static_urls + self._resolved))
