"""API keys -> tenants. Keys are kept only as SHA-256 digests and compared in constant time.

Sources: a keys file (`<key> <tenant>` per line, `#` comments) and LORAGATE_API_KEYS
(`key=tenant,key2=tenant2`); an admin key (LORAGATE_ADMIN_KEY) manages every tenant. With no
keys configured at all the server is open and every caller is the tenant "default", which
suits a local quick start; the server says so at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import APIError

OPEN_TENANT = "default"
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    is_admin: bool = False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    def __init__(self, keys: dict[str, str], admin_key: str | None = None):
        for tenant in keys.values():
            if not _TENANT.match(tenant):
                raise ValueError(f"invalid tenant name {tenant!r} in the API keys")
        self._entries = [(_digest(k), Principal(t)) for k, t in keys.items()]
        if admin_key:
            self._entries.append((_digest(admin_key), Principal("admin", is_admin=True)))

    @classmethod
    def from_sources(cls, keys_file: str | None, keys_env: str | None, admin_key: str | None) -> "KeyStore":
        keys: dict[str, str] = {}
        if keys_file:
            for n, line in enumerate(Path(keys_file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{keys_file}:{n}: expected '<key> <tenant>'")
                keys[parts[0]] = parts[1]
        for item in filter(None, (keys_env or "").split(",")):
            key, sep, tenant = item.strip().partition("=")
            if not sep:
                raise ValueError("LORAGATE_API_KEYS entries must be key=tenant")
            keys[key] = tenant
        return cls(keys, admin_key)

    @property
    def is_open(self) -> bool:
        return not self._entries

    def authenticate(self, authorization: str | None) -> Principal:
        if self.is_open:
            return Principal(OPEN_TENANT)
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")
        presented = _digest(authorization[len("Bearer "):].strip())
        found = None
        for digest, principal in self._entries:  # no early exit: timing says nothing about which
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        return found
