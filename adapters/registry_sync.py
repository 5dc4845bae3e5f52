"""How an AdapterRegistry follows a store that other servers write too (S3): a mixin, so
the registry's file stays about the index itself. It works on the registry's `store`,
`_lock`, `_entries`, `_cached`, `_write_lock`, `_from_store` and `_notify`.

Each check asks the store first and applies the answer after, under the adapter's write
lock; an answer is stale if this server changed the adapter after asking, and versions only
grow, so `_apply` never lets an older answer undo a newer local change.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

from .config import MAX_CONFIG_BYTES, LoraConfig
from .errors import AdapterError, AdapterNotFound
from .loader import CONFIG_FILE
from .store import StoredAdapter, check_name

__all__ = ["StoreSync"]

log = logging.getLogger("loragate.adapters.registry")
_MAX_REMEMBERED = 4096  # names recently missing from / deleted in the store, tenants recently listed


class StoreSync:
    refresh_interval: float | None

    def _init_sync(self, refresh_interval: float | None) -> None:
        # None: this registry is the store's only writer, never re-read it. Else how stale
        # the index may get with respect to changes made through other servers.
        self.refresh_interval = refresh_interval
        self._misses: OrderedDict[tuple[str, str], float] = OrderedDict()  # name -> when the store lacked it
        self._deleted: OrderedDict[tuple[str, str], int] = OrderedDict()  # name -> version deleted here
        self._listed: OrderedDict[str | None, float] = OrderedDict({None: time.monotonic()})  # tenant (None: all)

    def _read_config(self, stored: StoredAdapter) -> LoraConfig:
        read_file = getattr(self.store, "read_file", None)
        if read_file is None:
            return LoraConfig.from_file(stored.path / CONFIG_FILE)
        raw = read_file(stored, CONFIG_FILE, MAX_CONFIG_BYTES + 1)  # the same limits as from_file
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError("too_large", f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
        try:
            return LoraConfig.from_dict(json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError("invalid_config", f"{CONFIG_FILE}: not valid JSON: {e}") from None

    def _forget(self, tenant: str, name: str, version: int) -> None:
        with self._lock:
            self._entries.pop((tenant, name), None)
            self._cached.pop((tenant, name), None)
            self._drop_pinned(tenant, name)
            _remember(self._deleted, (tenant, name), version)
        self._notify(None, f"{tenant}/{name}")

    def _sync(self, tenant: str, name: str) -> None:
        """Ask the store about one adapter if this index lacks it or last checked it over
        refresh_interval ago. A miss is remembered for the interval too, so unknown names
        cannot turn every request into a store round trip."""
        if self.refresh_interval is None or not (_valid_name(tenant) and _valid_name(name)):
            return
        key, started = (tenant, name), time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if started - entry.checked_at < self.refresh_interval:
                    return
                entry.checked_at = started  # concurrent callers serve the entry meanwhile
            elif started - self._misses.get(key, float("-inf")) < self.refresh_interval:
                return
        try:
            describe = getattr(self.store, "describe", self.store.get)  # metadata; a local get is just that
            try:
                stored = describe(tenant, name)
            except AdapterNotFound:
                stored = None
            self._apply(tenant, name, stored, started)
        except Exception as e:  # noqa: BLE001 - the store is unreachable: serve what this index knows
            log.warning("cannot check the adapter store for %s/%s: %s", tenant, name, e)

    def _sync_listing(self, tenant: str | None) -> None:
        if self.refresh_interval is None or (tenant is not None and not _valid_name(tenant)):
            return
        started = time.monotonic()
        with self._lock:
            if started - self._listed.get(tenant, float("-inf")) < self.refresh_interval:
                return
            _remember(self._listed, tenant, started)
        try:
            latest = {(s.tenant, s.name): s for s in (self.store.list_all() if tenant is None else self.store.list(tenant))}
            with self._lock:
                gone = [k for k in self._entries if (tenant is None or k[0] == tenant) and k not in latest]
            for key in gone:
                self._apply(*key, None, started)
            for key, stored in latest.items():
                self._apply(*key, stored, started)
        except Exception as e:  # noqa: BLE001 - as in _sync
            log.warning("cannot list the adapter store%s: %s", f" for tenant {tenant}" if tenant else "", e)

    def _apply(self, tenant: str, name: str, stored: StoredAdapter | None, started: float) -> None:
        """Bring one entry in line with what the store answered (None: absent) to a question
        asked at `started`, unless this server changed the adapter since: versions only grow,
        so an answer older than the entry never replaces it."""
        key = (tenant, name)
        with self._write_lock(tenant, name):
            with self._lock:
                entry = self._entries.get(key)
                if stored is None:
                    if entry is None or entry.created_at > started:
                        _remember(self._misses, key, started)
                        return
                    del self._entries[key]
                    self._cached.pop(key, None)
                    self._drop_pinned(tenant, name)
                elif (entry is not None and entry.info.version >= stored.version) or \
                        stored.version <= self._deleted.get(key, 0):
                    return
            if stored is None:
                log.info("adapter %s/%s was deleted through another server", tenant, name)
                self._notify(None, f"{tenant}/{name}")
                return
            try:
                new = self._from_store(stored)
            except AdapterNotFound:  # deleted again since the answer: the next check sees it
                return
            with self._lock:
                self._entries[key] = new
                self._misses.pop(key, None)
            log.info("adapter %s is now version %d (changed through another server)", new.info.id, new.info.version)
            self._notify(new.info, new.info.id)


def _valid_name(value: str) -> bool:
    try:
        check_name("name", value)
        return True
    except AdapterError:
        return False


def _remember(recent: OrderedDict, key, value) -> None:
    recent[key] = value
    recent.move_to_end(key)
    while len(recent) > _MAX_REMEMBERED:
        recent.popitem(last=False)
