"""A local directory of adapter versions fetched from a remote store, so the loader can read
them as files: `root/<tenant>/<name>/v<N>/` holding the files and the version's meta.json.

Stored versions are immutable and their numbers are never reused, so an entry never goes
stale and a hit needs no remote call. A version appears by one os.rename of a complete temp
dir (the caller verified its sha256 first), so a crash leaves only `.tmp` leftovers, removed
at start-up once they are an hour old. The size is bounded softly: after a publish, the least
recently used versions are removed until the total fits, except those used in the last
IN_USE_GRACE_S seconds (a loader may be reading them right now). Use order survives restarts
as meta.json's mtime. Engines may share a root (one LORAGATE_HOME volume): temp names are
unique, a version published twice keeps the first copy, and each process bounds the size by
what it knows of.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from .store import META_FILE, StoredAdapter, _from_meta, _fsync_dir

__all__ = ["IN_USE_GRACE_S", "AdapterCache"]

log = logging.getLogger(__name__)
IN_USE_GRACE_S = 60.0
LEFTOVER_AGE_S = 3600.0  # a download or removal this old belongs to a process that died
_TMP, _TRASH = ".tmp", ".trash"

Key = tuple[str, str, int]  # (tenant, name, version)


class AdapterCache:
    def __init__(self, root: str | Path, max_bytes: int | None = None):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (_TMP, _TRASH):
            (self.root / d).mkdir(exist_ok=True)
            for leftover in os.scandir(self.root / d):
                try:
                    if leftover.stat(follow_symlinks=False).st_mtime < time.time() - LEFTOVER_AGE_S:
                        shutil.rmtree(leftover.path, ignore_errors=True)
                except FileNotFoundError:
                    pass  # another process sharing the root finished with it meanwhile
        # key -> (size in bytes, last use as unix time), least recently used first
        self._entries: OrderedDict[Key, tuple[int, float]] = OrderedDict(sorted(self._scan(), key=lambda kv: kv[1][1]))

    def path(self, tenant: str, name: str, version: int) -> Path:
        return self.root / tenant / name / f"v{version}"

    def lookup(self, tenant: str, name: str, version: int) -> StoredAdapter | None:
        """The cached version (marked used), or None when it is not here."""
        path = self.path(tenant, name, version)
        stored = self.peek(tenant, name, version)
        if stored is None:
            return None
        with self._lock:
            size = self._entries[(tenant, name, version)][0] if (tenant, name, version) in self._entries else _size(path)
            self._use((tenant, name, version), size)
        return stored

    def peek(self, tenant: str, name: str, version: int) -> StoredAdapter | None:
        """Like lookup, without counting as a use (for metadata reads)."""
        return _read(self.path(tenant, name, version))

    def staging_dir(self) -> Path:
        """A fresh private dir on the cache's filesystem, for the caller to fill and publish."""
        return Path(tempfile.mkdtemp(prefix="get-", dir=self.root / _TMP))

    def publish(self, staged: Path, tenant: str, name: str, version: int) -> StoredAdapter:
        """Move a complete, verified staged dir (files + meta.json) into place; if another
        thread published the same version first, keep theirs (the bytes are the same)."""
        target = self.path(tenant, name, version)
        for f in staged.iterdir():
            _fsync_file(f)
        _fsync_dir(staged)
        with self._lock:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, target)
                _fsync_dir(target.parent)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(staged, ignore_errors=True)
            self._use((tenant, name, version), _size(target))
            self._evict(keep=(tenant, name, version))
        stored = _read(target)
        if stored is None:  # only if someone removed files under our root by hand
            raise FileNotFoundError(f"adapter cache entry {target} vanished right after publishing")
        return stored

    def discard(self, tenant: str, name: str) -> None:
        """Forget every cached version of one adapter (it was deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[:2] == (tenant, name)]:
                del self._entries[key]
            self._remove(self.root / tenant / name)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._entries.values())

    # -- internals (called with self._lock held unless said otherwise) --------------------------

    def _use(self, key: Key, size: int) -> None:
        now = time.time()
        self._entries[key] = (size, now)
        self._entries.move_to_end(key)
        try:
            os.utime(self.path(*key) / META_FILE, (now, now))
        except OSError:
            pass  # only the order after a restart suffers

    def _evict(self, keep: Key) -> None:
        if self.max_bytes is None:
            return
        total = sum(size for size, _ in self._entries.values())
        cutoff = time.time() - IN_USE_GRACE_S
        for key, (size, last_used) in list(self._entries.items()):
            if total <= self.max_bytes or last_used > cutoff:
                break  # the rest were used even more recently
            if key == keep:
                continue
            del self._entries[key]
            self._remove(self.path(*key))
            total -= size
            log.info("adapter cache: evicted %s/%s@%d (%d bytes)", *key, size)

    def _remove(self, path: Path) -> None:
        trash = self.root / _TRASH / uuid.uuid4().hex
        try:
            os.rename(path, trash)  # atomic: a reader sees the version whole or not at all
        except FileNotFoundError:
            return  # never cached here, or removed by another process sharing the root
        shutil.rmtree(trash, ignore_errors=True)
        for parent in (path.parent, path.parent.parent):
            if parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break  # not empty: other versions or adapters live there

    def _scan(self):
        for meta in self.root.glob(f"*/*/v*/{META_FILE}"):
            stored = _read(meta.parent)
            if stored is not None and meta.parent == self.path(stored.tenant, stored.name, stored.version):
                yield (stored.tenant, stored.name, stored.version), (_size(meta.parent), meta.stat().st_mtime)


def _read(path: Path) -> StoredAdapter | None:
    try:
        return _from_meta(json.loads((path / META_FILE).read_text()), path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("adapter cache: ignoring %s: unreadable %s (%s)", path, META_FILE, e)
        return None


def _size(path: Path) -> int:
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path))
    except FileNotFoundError:
        return 0


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
