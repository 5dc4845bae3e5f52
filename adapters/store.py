"""Durable adapter bytes: `root/<tenant>/<name>/v<N>/` holding the uploaded files and a
meta.json, each version immutable once it appears.

A version appears by one os.rename of a fully written, fsynced temp dir, so a reader (or a
restart after a crash) sees a version whole or not at all. Versions only grow, even across
delete: the engine's prefix cache and the slot pool key adapters by (name, version), so a
re-uploaded name must never come back under a version number that was already served.
Processes may share a root (a fleet's engines on one volume): a version is chosen and
published, and a name deleted, under an flock on `root/.lock` (and a threading.Lock for this
process's threads). Start-up clears crash leftovers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import AdapterError, AdapterNotFound

__all__ = ["AdapterStore", "LocalAdapterStore", "StoredAdapter", "AdapterNotFound", "check_name"]

log = logging.getLogger(__name__)
META_FILE = "meta.json"
# Dot-names cannot be tenants or adapters (see _NAME), so these never collide with them.
_TMP, _TRASH, _SEQ, _LOCK = ".tmp", ".trash", ".seq", ".lock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_CHUNK = 1 << 20
LEFTOVER_AGE_S = 3600


@dataclass(frozen=True)
class StoredAdapter:
    tenant: str
    name: str
    version: int
    sha256: str  # sha256 of `sha256sum`-style lines "<file sha256>  <name>\n", files sorted by name
    path: Path  # the version directory, loadable with loader.load_adapter
    created: float  # unix time
    files: tuple[str, ...] = ()


@runtime_checkable
class AdapterStore(Protocol):
    def put(self, tenant: str, name: str, src_dir: str | Path, *, reuse_same: bool = False) -> StoredAdapter:
        """Store src_dir's files as the next version; with reuse_same, the latest version
        instead when it holds the same files (no new version)."""
    def get(self, tenant: str, name: str, version: int | None = None) -> StoredAdapter: ...
    def versions(self, tenant: str, name: str) -> list[StoredAdapter]:
        """Every stored version of one adapter, oldest first (AdapterNotFound if none)."""
    def list(self, tenant: str) -> list[StoredAdapter]: ...
    def list_all(self) -> list[StoredAdapter]: ...
    def delete(self, tenant: str, name: str) -> None: ...


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise AdapterError("invalid_name", f"{kind} name {value!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit, without '..'")
    return value


class LocalAdapterStore:
    def __init__(self, root: str | Path, *, max_total_bytes: int | None = None):
        self.root = Path(root).resolve()
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (_TMP, _TRASH, _SEQ):
            (self.root / d).mkdir(exist_ok=True)
        # Half-written puts and half-removed deletes of a crashed run. Only old ones: engines
        # of a fleet may share this root, and a fresh entry may be another one's upload.
        cutoff = time.time() - LEFTOVER_AGE_S
        for d in (_TMP, _TRASH):
            for entry in (self.root / d).iterdir():
                with contextlib.suppress(OSError):
                    if entry.lstat().st_mtime < cutoff:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    # -- writes ----------------------------------------------------------------------------

    def put(self, tenant: str, name: str, src_dir: str | Path, *, reuse_same: bool = False) -> StoredAdapter:
        src = checked_upload_dir(tenant, name, src_dir)
        tmp = Path(tempfile.mkdtemp(prefix="put-", dir=self.root / _TMP))
        try:
            files = copy_upload_files(src, tmp, self.max_total_bytes)  # the slow part, outside the lock
            digest = files_digest(files)
            with self._exclusive():
                latest = self._latest(tenant, name) if reuse_same else None
                if latest is not None and latest.sha256 == digest:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return latest
                version = self._next_version(tenant, name)
                meta = {"tenant": tenant, "name": name, "version": version, "sha256": digest, "created": time.time(),
                        "files": [{"name": n, "sha256": h, "size": s} for n, h, s in files]}
                _write_durable(tmp / META_FILE, json.dumps(meta, indent=1).encode())
                _fsync_dir(tmp)
                made = [d for d in (self.root / tenant, self.root / tenant / name) if not d.exists()]
                try:
                    for d in made:
                        d.mkdir()
                    os.rename(tmp, self.root / tenant / name / f"v{version}")
                except BaseException:
                    for d in reversed(made):  # leave no empty tenant/name dirs behind
                        _rmdir_quietly(d)
                    raise
                for d in (self.root / tenant / name, self.root / tenant, self.root):
                    _fsync_dir(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _from_meta(meta, self.root / tenant / name / f"v{version}")

    def delete(self, tenant: str, name: str) -> None:
        check_name("tenant", tenant)
        check_name("adapter", name)
        path = self.root / tenant / name
        with self._exclusive():
            versions = _versions(path)
            if not versions:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            # Remember the highest version first: a crash after this line loses nothing.
            last_version = self._next_version(tenant, name) - 1
            (self.root / _SEQ / tenant).mkdir(exist_ok=True)
            _write_durable(self.root / _TMP / f"seq-{uuid.uuid4().hex}", str(last_version).encode(),
                           rename_to=self.root / _SEQ / tenant / name)
            trash = self.root / _TRASH / uuid.uuid4().hex
            os.rename(path, trash)  # atomic: readers see all versions or none
            _rmdir_quietly(self.root / tenant)
            _fsync_dir(self.root / tenant if (self.root / tenant).exists() else self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # -- reads -----------------------------------------------------------------------------

    def get(self, tenant: str, name: str, version: int | None = None) -> StoredAdapter:
        check_name("tenant", tenant)
        check_name("adapter", name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise AdapterError("invalid_name", f"version must be a positive integer, got {version!r}")
        path = self.root / tenant / name
        versions = _versions(path)
        if version is None and versions:
            version = versions[-1]
        if version not in versions:
            what = f"version {version} of adapter {name!r}" if versions else f"adapter {name!r}"
            raise AdapterNotFound(f"{what} does not exist")
        found = _load(path / f"v{version}")
        if found is None:  # deleted between listing and reading
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return found

    def versions(self, tenant: str, name: str) -> list[StoredAdapter]:
        check_name("tenant", tenant)
        check_name("adapter", name)
        path = self.root / tenant / name
        found = [s for s in (_load(path / f"v{v}") for v in _versions(path)) if s is not None]
        if not found:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return found

    def list(self, tenant: str) -> list[StoredAdapter]:
        """The latest version of each of the tenant's adapters, by name."""
        check_name("tenant", tenant)
        out = []
        for name in _child_names(self.root / tenant):
            versions = _versions(self.root / tenant / name)
            found = _load(self.root / tenant / name / f"v{versions[-1]}") if versions else None
            if found is not None:
                out.append(found)
        return out

    def list_all(self) -> list[StoredAdapter]:
        return [a for tenant in _child_names(self.root) for a in self.list(tenant)]

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self):
        """Held while a version is chosen and published or a name deleted: across this
        process's threads and every other process writing the root."""
        with self._lock, open(self.root / _LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
            yield

    def _latest(self, tenant: str, name: str) -> StoredAdapter | None:
        versions = _versions(self.root / tenant / name)
        return _load(self.root / tenant / name / f"v{versions[-1]}") if versions else None

    def _next_version(self, tenant: str, name: str) -> int:
        versions = _versions(self.root / tenant / name)
        try:
            deleted = int((self.root / _SEQ / tenant / name).read_text())
        except (FileNotFoundError, ValueError):
            deleted = 0
        return max(versions[-1] if versions else 0, deleted) + 1


def checked_upload_dir(tenant: str, name: str, src_dir: str | Path) -> Path:
    """A put's arguments, checked before anything is written: the names, then the directory."""
    check_name("tenant", tenant)
    check_name("adapter", name)
    src = Path(src_dir)
    if not src.is_dir():
        raise AdapterError("missing_file", f"upload directory {str(src)!r} does not exist")
    return src


def files_digest(files: list[tuple[str, str, int]]) -> str:
    """An adapter version's sha256: over `sha256sum`-style lines of its (name, sha256, size)
    files, sorted by name."""
    return hashlib.sha256("".join(f"{h}  {n}\n" for n, h, _ in sorted(files)).encode()).hexdigest()


def allowed_file_name(name: str) -> bool:
    """The local store's rule for an uploaded file's name (scandir never yields "", "." or a "/")."""
    return not any(ord(c) < 32 or ord(c) == 127 for c in name) and _encodable(name)


def copy_upload_files(src: Path, dst: Path, max_total_bytes: int | None,
                      name_allowed: Callable[[str], bool] = allowed_file_name) -> list[tuple[str, str, int]]:
    """Copy src's regular files (never following links) into dst; (name, sha256, size) each.
    Both stores apply these rules to an upload, so they accept the same adapters."""
    files, total = [], 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            continue  # links, subdirectories, devices, fifos: an upload is a flat set of files
        if entry.name == META_FILE or not name_allowed(entry.name):
            raise AdapterError("invalid_name", f"file name {entry.name!r} is reserved or not allowed in an adapter")
        # O_NOFOLLOW/O_NONBLOCK: the entry may be swapped for a link or fifo after scandir.
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if max_total_bytes is not None and total + st.st_size > max_total_bytes:
                raise AdapterError("too_large", f"adapter files exceed {max_total_bytes} bytes (at {entry.name!r})")
            sha, size = _copy_file(fd, dst / entry.name)
        finally:
            os.close(fd)
        total += size
        files.append((entry.name, sha, size))
    if not files:
        raise AdapterError("missing_file", f"upload directory {str(src)!r} holds no regular files")
    return files


def _copy_file(src_fd: int, dst: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(dst, "xb") as out:
        while chunk := os.read(src_fd, _CHUNK):
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def _write_durable(path: Path, data: bytes, rename_to: Path | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if rename_to is not None:
        os.replace(path, rename_to)
        _fsync_dir(rename_to.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (or gone): someone else's adapters live there


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes from the filesystem (surrogate escapes)
        return False


def _child_names(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False) and _NAME.fullmatch(e.name))
    except FileNotFoundError:
        return []


def _versions(path: Path) -> list[int]:
    try:
        return sorted(int(m[1]) for e in os.scandir(path) if (m := _VERSION_DIR.fullmatch(e.name)))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _load(version_dir: Path) -> StoredAdapter | None:
    try:
        meta = json.loads((version_dir / META_FILE).read_text())
        return _from_meta(meta, version_dir)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: unreadable %s (%s)", version_dir, META_FILE, e)
        return None


def _from_meta(meta: dict, path: Path) -> StoredAdapter:
    return StoredAdapter(tenant=meta["tenant"], name=meta["name"], version=int(meta["version"]), sha256=meta["sha256"],
                         path=path, created=float(meta["created"]), files=tuple(f["name"] for f in meta["files"]))
