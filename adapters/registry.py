"""The adapter registry: the one place that knows every adapter, its tenant, version and state.

An upload is validated (loader.load_adapter) before anything is stored, so a refused adapter
leaves the store untouched and burns no version number. After a restart the index is rebuilt
from the store reading only each adapter_config.json; weights are read on first use (state
LOADING) and checked against the sha256 recorded at upload, so bytes that changed on disk are
refused (FAILED) rather than served. Tenants see only their own adapters: another tenant's
answers AdapterNotFound, exactly as if it did not exist.

Several servers may share one store (S3). A name this index lacks is looked up in the store
(get/weights), and what the index holds is re-checked against the store at most every
`refresh_interval` seconds (per adapter on get/weights, per tenant on list), so uploads, new
versions and deletes made through another server are seen; listeners hear of them as of
local ones. A store whose bytes are remote offers describe() (metadata only) and read_file()
(one small file), so indexing never downloads weights; its get() makes a version local.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import AdapterError, AdapterNotFound
from .host_lru import DEFAULT_MAX_BYTES, HostLru
from .loader import CONFIG_FILE, DEFAULT_MAX_ADAPTER_BYTES, WEIGHTS_FILE, LoraWeights, load_adapter
from .registry_sync import StoreSync
from .store import AdapterStore, StoredAdapter, check_name

__all__ = ["AdapterInfo", "AdapterRegistry", "AdapterState"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_STRIPES = 64  # per-adapter write locks, striped so unknown names cannot grow a dict of locks
MAX_PINNED = 8  # older versions requests name (name@N) whose weights are held: a canary or a rollback's few


class AdapterState(str, enum.Enum):  # a str, so it serialises to JSON as "READY"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    version: int
    sha256: str
    rank: int
    target_modules: tuple[str, ...]  # module names (q_proj, ...), sorted
    state: AdapterState
    error: str | None
    created: float
    dora: bool = False  # a DoRA adapter (use_dora)

    @property
    def id(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def key(self) -> str:
        """What the engine's slot pool and prefix cache key on: a new version never shares them."""
        return f"{self.tenant}/{self.name}@{self.version}"


Listener = Callable[[AdapterInfo | None, str], None]  # (info, or None when deleted; adapter id)


class _Entry:
    """The latest version of one adapter. A new version gets a new entry, so a slow load of
    the old version that finishes late cannot attach its weights to the new one."""

    def __init__(self, info: AdapterInfo, stored: StoredAdapter, weights: LoraWeights | None = None,
                 error: AdapterError | None = None):
        self.info, self.stored, self.weights, self.error = info, stored, weights, error
        self.load_lock = threading.Lock()  # one reader of the files; other callers wait for it
        self.created_at = self.checked_at = time.monotonic()  # checked: last compared with the store


class AdapterRegistry(StoreSync):
    def __init__(self, store: AdapterStore, arch, max_lora_rank: int, *, base_model_name: str | None = None,
                 strict_base_model: bool = False, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
                 on_change: Listener | None = None, max_cached_weights: int = 64,
                 max_cached_bytes: int = DEFAULT_MAX_BYTES, refresh_interval: float | None = 2.0,
                 check_weights: Callable[[LoraWeights], None] | None = None):
        """check_weights: the engine's checks of an upload against the base model's weights, which
        the registry does not have (raises AdapterError)."""
        self.store, self.arch, self.max_lora_rank = store, arch, max_lora_rank
        self._check_weights = check_weights
        self.base_model_name, self.strict_base_model = base_model_name, strict_base_model
        self._load_kwargs = dict(base_model_name=base_model_name, strict_base_model=strict_base_model,
                                 max_bytes=max_bytes)
        self.listeners: list[Listener] = [on_change] if on_change else []
        self._lock = threading.Lock()  # guards _entries and entry fields; never held during file I/O
        # Held across store write + index update + notification, so a delete cannot interleave
        # with a register of the same name and listeners see one adapter's changes in order.
        self._write_locks = [threading.RLock() for _ in range(_STRIPES)]
        self._init_sync(refresh_interval)
        self._entries: dict[tuple[str, str], _Entry] = {}
        for stored in store.list_all():
            try:
                self._entries[(stored.tenant, stored.name)] = self._from_store(stored)
            except AdapterNotFound:  # deleted through another server since the listing
                continue
        # Weights held in memory, least recently used first: a tenant with thousands of
        # adapters must not keep them all in RAM; an evicted one is read from disk again.
        self._cached = HostLru(max_cached_weights, max_cached_bytes, keep_newest=True)  # whose weights are held
        # (tenant, name, version) -> (info, weights, when last checked against the store): older
        # versions that requests pin, least recently used first
        self._pinned: OrderedDict[tuple[str, str, int], tuple[AdapterInfo, LoraWeights, float]] = OrderedDict()

    # -- writes ----------------------------------------------------------------------------

    def register(self, tenant: str, name: str, src_dir: str | Path, *, reuse_same: bool = False) -> AdapterInfo:
        """Validate and store src_dir as the adapter's next version (reuse_same: see AdapterStore.put)."""
        check_name("tenant", tenant)  # cheap checks first: refuse before reading any weights
        check_name("adapter", name)
        src = Path(src_dir)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if (src / f).is_symlink():  # the store copies regular files only: it would validate, then be lost
                raise AdapterError("missing_file", f"{f} is a symbolic link; upload the file itself")
        # src_dir must not change until this returns (it is the caller's private upload dir).
        weights = load_adapter(src, self.arch, self.max_lora_rank, **self._load_kwargs)
        if self._check_weights is not None:
            self._check_weights(weights)
        with self._write_lock(tenant, name):
            stored = self.store.put(tenant, name, src, reuse_same=reuse_same)
            info = _ready_info(stored, weights)
            with self._lock:
                self._entries[(tenant, name)] = _Entry(info, stored, weights)  # kept: first use reads no disk
                self._touch((tenant, name))
            self._notify(info, info.id)
        return info

    def delete(self, tenant: str, name: str) -> None:
        with self._write_lock(tenant, name):
            version = self.get(tenant, name).version  # AdapterNotFound before the store sees another tenant's name
            try:
                self.store.delete(tenant, name)
            except AdapterNotFound:  # already deleted through another server: forget it too
                self._forget(tenant, name, version)
                raise
            self._forget(tenant, name, version)

    # -- reads -----------------------------------------------------------------------------

    def get(self, tenant: str, name: str) -> AdapterInfo:
        self._sync(tenant, name)
        with self._lock:
            return self._entry(tenant, name).info

    def versions(self, tenant: str, name: str) -> list[StoredAdapter]:
        """Every stored version of the tenant's adapter, oldest first; any request may pin one."""
        self._sync(tenant, name)
        with self._lock:
            self._entry(tenant, name)  # another tenant's name: AdapterNotFound, as for every read
        return self.store.versions(tenant, name)

    def list(self, tenant: str) -> list[AdapterInfo]:
        self._sync_listing(tenant)
        with self._lock:
            return sorted((e.info for (t, _), e in self._entries.items() if t == tenant), key=lambda i: i.name)

    def list_all(self) -> list[AdapterInfo]:
        self._sync_listing(None)
        with self._lock:
            return sorted((e.info for e in self._entries.values()), key=lambda i: (i.tenant, i.name))

    def weights(self, tenant: str, name: str, version: int | None = None) -> tuple[AdapterInfo, LoraWeights]:
        """The latest version's info and weights, or those of `version` (an older one a request
        pins), read from the store on first use."""
        self._sync(tenant, name)
        with self._lock:
            entry = self._entry(tenant, name)  # a deleted adapter's versions are all gone
            pinned = version is not None and version != entry.info.version
            if not pinned and entry.weights is not None:
                self._touch((tenant, name))
                return entry.info, entry.weights
        if pinned:
            return self._pinned_version(tenant, name, version)
        with entry.load_lock:
            with self._lock:
                if entry.weights is not None:  # another thread loaded it while we waited
                    return entry.info, entry.weights
                if entry.error is not None:  # stored versions are immutable: a failure is final
                    raise AdapterError(entry.error.code, entry.error.message)
                entry.info = replace(entry.info, state=AdapterState.LOADING)
            try:
                stored = self.store.get(tenant, name, entry.info.version)  # a remote store downloads it (once)
                weights = self._load_stored(stored)
            except AdapterNotFound:  # deleted through another server: the next call asks the store
                with self._lock:
                    entry.info, entry.checked_at = replace(entry.info, state=AdapterState.READY), float("-inf")
                raise AdapterNotFound(f"adapter {name!r} does not exist") from None
            except AdapterError as e:
                err = AdapterError(e.code, f"stored adapter {entry.info.key} no longer loads: {e.message}")
                with self._lock:
                    entry.error, entry.info = err, replace(entry.info, state=AdapterState.FAILED, error=err.message)
                    if (tenant, name) not in self._entries:  # deleted while we read: say so, not "corrupt"
                        raise AdapterNotFound(f"adapter {name!r} does not exist") from None
                log.error("%s", err.message)
                raise err from None
            except BaseException:  # not the files' fault (memory, interrupt): the next call retries
                with self._lock:
                    entry.info = replace(entry.info, state=AdapterState.READY)
                raise
            with self._lock:
                entry.weights, entry.info = weights, replace(entry.info, state=AdapterState.READY, error=None)
                if self._entries.get((tenant, name)) is entry:
                    self._touch((tenant, name))
                return entry.info, weights

    # -- internals -------------------------------------------------------------------------

    def _pinned_version(self, tenant: str, name: str, version: int) -> tuple[AdapterInfo, LoraWeights]:
        """An older version, checked against the store at most every refresh_interval (it may
        have been deleted through another server) and otherwise held among MAX_PINNED."""
        key, now = (tenant, name, version), time.monotonic()
        with self._lock:
            held = self._pinned.get(key)
            if held is not None and now - held[2] < (self.refresh_interval or float("inf")):
                self._pinned.move_to_end(key)
                return held[0], held[1]
        describe = getattr(self.store, "describe", self.store.get)
        try:
            stored = describe(tenant, name, version) if held is not None else self.store.get(tenant, name, version)
        except AdapterNotFound:
            with self._lock:
                self._pinned.pop(key, None)
            raise AdapterNotFound(f"version {version} of adapter {name!r} does not exist") from None
        if held is None:
            weights = self._load_stored(stored)
            held = (_ready_info(stored, weights), weights)
        with self._lock:
            self._pinned[key] = (held[0], held[1], now)
            self._pinned.move_to_end(key)
            while len(self._pinned) > MAX_PINNED:
                self._pinned.popitem(last=False)
        return held[0], held[1]

    def _load_stored(self, stored: StoredAdapter) -> LoraWeights:
        """A stored version's weights, its files first checked against the digest of its upload."""
        _check_sha256(stored)
        return load_adapter(stored.path, self.arch, self.max_lora_rank, **self._load_kwargs)

    def _drop_pinned(self, tenant: str, name: str) -> None:
        """Forget the held older versions of a deleted adapter. Called with self._lock held."""
        for key in [k for k in self._pinned if k[:2] == (tenant, name)]:
            del self._pinned[key]

    def _touch(self, key: tuple[str, str]) -> None:
        """Mark key's weights most recently used; drop the least recently used beyond the cap.
        Called with self._lock held."""
        entry = self._entries.get(key)
        for old, _ in self._cached.put(key, None, entry.weights.num_bytes if entry and entry.weights else 0):
            entry = self._entries.get(old)
            if entry is not None:
                entry.weights = None

    def _entry(self, tenant: str, name: str) -> _Entry:
        entry = self._entries.get((tenant, name))
        if entry is None:  # the same answer whether absent or another tenant's: ids do not leak
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return entry

    def _write_lock(self, tenant: str, name: str) -> threading.RLock:
        return self._write_locks[hash((tenant, name)) % _STRIPES]

    def _from_store(self, stored: StoredAdapter) -> _Entry:
        """Index a stored adapter from its config alone (no weights read), checked against this
        server's settings, which may have changed since it was uploaded."""
        rank, modules, error, dora = 0, set(), None, False
        try:
            config = self._read_config(stored)
            rank, dora = config.max_rank, config.use_dora
            config.check_base_model(self.base_model_name, self.strict_base_model)
            config.check_rank(self.max_lora_rank)
            modules = {m for _, m in config.on_model(self.arch).targets(self.arch.num_layers)}
        except AdapterError as e:
            error = AdapterError(e.code, f"stored adapter {stored.tenant}/{stored.name}@{stored.version} "
                                         f"cannot be served: {e.message}")
            log.error("%s", error.message)
        state = AdapterState.FAILED if error else AdapterState.READY
        return _Entry(_info(stored, rank, modules, state, error and error.message, dora), stored, error=error)

    def _notify(self, info: AdapterInfo | None, adapter_id: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(info, adapter_id)
            except Exception:  # the change is already durable; a listener cannot undo it
                log.exception("adapter listener %r failed for %s", listener, adapter_id)


def _info(stored: StoredAdapter, rank: int, modules, state: AdapterState, error: str | None,
          dora: bool) -> AdapterInfo:
    return AdapterInfo(tenant=stored.tenant, name=stored.name, version=stored.version, sha256=stored.sha256,
                       rank=rank, target_modules=tuple(sorted(modules)), state=state, error=error,
                       created=stored.created, dora=dora)


def _ready_info(stored: StoredAdapter, weights: LoraWeights) -> AdapterInfo:
    return _info(stored, weights.rank, {m for _, m in weights.modules}, AdapterState.READY, None,
                 weights.config.use_dora)


def _check_sha256(stored: StoredAdapter) -> None:
    """Recompute the store's digest (format: StoredAdapter.sha256) so files that changed after
    upload are refused, including bit flips that would still parse as a valid adapter."""
    lines = []
    for f in stored.files:
        h = hashlib.sha256()
        try:
            with open(stored.path / f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            raise AdapterError("missing_file", f"{f} is missing from the stored adapter") from None
        lines.append(f"{h.hexdigest()}  {f}\n")
    if hashlib.sha256("".join(lines).encode()).hexdigest() != stored.sha256:
        raise AdapterError("invalid_weights", "its files changed on disk after upload (sha256 mismatch)")
