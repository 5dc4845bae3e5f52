"""API keys -> tenants. Keys are kept only as SHA-256 digests and compared in constant time.

Sources: a keys file (`<key> <tenant>` per line, `#` comments) and LORAGATE_API_KEYS
(`key=tenant,key2=tenant2`); an admin key (LORAGATE_ADMIN_KEY) manages every tenant. With no
keys configured at all the server is open and every caller is the tenant "default", which
suits a local quick start; the server says so at start-up.

The keys file is read again every KEYS_RELOAD_SECONDS (watch_keys_file), so keys are added and
revoked without a restart, as a Kubernetes Secret mounted as a volume is updated in place. A
file that cannot be read or parsed leaves the keys in use as they are. A server given a keys
file is never open, even while the file holds no keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import APIError

log = logging.getLogger("loragate.gateway")

OPEN_TENANT = "default"
KEYS_RELOAD_SECONDS = 5.0
# A changed keys file is taken only when a second read this much later agrees: one rewritten
# in place (`cat > keys`) reads empty or half-written for a moment, and an empty file would
# revoke every key until the next reload.
KEYS_SETTLE_SECONDS = 0.2
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    is_admin: bool = False


def authorization_of(headers) -> str | None:
    """The request's credentials as an Authorization header: OpenAI's `Authorization: Bearer`,
    or Anthropic's `x-api-key` (its SDK's way: gateway/messages_api.py)."""
    key = headers.get("x-api-key")
    return headers.get("authorization") or (f"Bearer {key}" if key else None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entries(keys: dict[str, str], admin_key: str | None) -> list[tuple[bytes, Principal]]:
    for tenant in keys.values():
        if not TENANT_NAME.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r} in the API keys")
    entries = [(_digest(k), Principal(t)) for k, t in keys.items()]
    if admin_key:
        entries.append((_digest(admin_key), Principal("admin", is_admin=True)))
    return entries


def _parse_keys_file(text: str, name: str) -> dict[str, str]:
    keys = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{name}:{n}: expected '<key> <tenant>'")
        keys[parts[0]] = parts[1]
    return keys


class KeyStore:
    def __init__(self, keys: dict[str, str], admin_key: str | None = None):
        self._entries = _entries(keys, admin_key)
        self.keys_file: str | None = None  # re-read by reload()
        self.reload_errors = 0  # reloads of the keys file that failed (the keys in use stayed)
        self._sources: tuple[str | None, str | None] = (None, admin_key)  # LORAGATE_API_KEYS, admin key
        self._file_digest: bytes | None = None

    @classmethod
    def from_sources(cls, keys_file: str | None, keys_env: str | None, admin_key: str | None) -> "KeyStore":
        store = cls({}, admin_key)
        store.keys_file, store._sources = keys_file, (keys_env, admin_key)
        store._load(Path(keys_file).read_text() if keys_file else "")
        return store

    def _load(self, text: str) -> None:
        keys_env, admin_key = self._sources
        keys = _parse_keys_file(text, self.keys_file) if self.keys_file else {}
        for item in filter(None, (keys_env or "").split(",")):
            key, sep, tenant = item.strip().partition("=")
            if not sep:
                raise ValueError("LORAGATE_API_KEYS entries must be key=tenant")
            keys[key] = tenant
        self._entries = _entries(keys, admin_key)  # one assignment: a request sees the old keys or the new
        self._file_digest = _digest(text)

    def reload(self) -> bool:
        """Read the keys file again; True if it changed, and its keys now hold. A file that
        cannot be read (OSError) or parsed (ValueError) raises, and the keys in use stay; one
        still changing (two reads KEYS_SETTLE_SECONDS apart differ) is left for the next
        reload. Blocks for that while: call it from a worker thread in an event loop."""
        text = Path(self.keys_file).read_text()
        if _digest(text) == self._file_digest:
            return False
        time.sleep(KEYS_SETTLE_SECONDS)
        if Path(self.keys_file).read_text() != text:
            return False
        self._load(text)
        return True

    @property
    def num_keys(self) -> int:
        """Keys that authenticate (the admin key included)."""
        return len(self._entries)

    @property
    def is_open(self) -> bool:
        return not self._entries and self.keys_file is None

    def authenticate(self, authorization: str | None) -> Principal:
        if self.is_open:
            return Principal(OPEN_TENANT)
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                           "authentication_error",
                           code="invalid_api_key")
        presented = _digest(authorization[len("Bearer "):].strip())
        found = None
        for digest, principal in self._entries:  # no early exit: timing says nothing about which
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        return found


async def watch_keys_file(keys: KeyStore) -> None:
    """Reload `keys` from its file every KEYS_RELOAD_SECONDS, until cancelled."""
    last_error = None
    while True:
        await asyncio.sleep(KEYS_RELOAD_SECONDS)
        try:
            if await asyncio.to_thread(keys.reload):
                log.warning("API keys reloaded from %s: %d keys", keys.keys_file, keys.num_keys)
            last_error = None
        except (OSError, ValueError) as e:
            keys.reload_errors += 1
            if str(e) != last_error:  # once per problem, not every few seconds
                log.error("API keys file %s not reloaded, the keys in use stay: %s", keys.keys_file, e)
            last_error = str(e)


@contextlib.asynccontextmanager
async def keys_file_watched(keys: KeyStore | None):
    """watch_keys_file(keys) for as long as the context lasts, where keys come from a file."""
    if keys is None or keys.keys_file is None:
        yield
        return
    task = asyncio.create_task(watch_keys_file(keys))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
