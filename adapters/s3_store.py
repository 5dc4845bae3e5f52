"""Durable adapter bytes in an S3 bucket (AWS or any S3-compatible service), with the same
semantics as LocalAdapterStore, shared by every engine that points at the bucket.

Layout under `<prefix>/`:
    <tenant>/<name>/v<N>/<file>       the uploaded files
    <tenant>/<name>/v<N>/meta.json    written LAST: a version exists once its meta.json does
    .seq/<tenant>/<name>              the highest version number ever allocated, kept across
                                      delete so a re-upload never reuses a served version
    .claims/<tenant>/<name>/<sha256>  while one server stores files that others want stored
                                      too (put's reuse_same), so they wait and use its version

Readers ignore versions without meta.json, so a put that dies midway leaves nothing visible;
a put that fails deletes what it wrote, and `sweep_incomplete` removes what a crash left.
Version numbers are allocated by compare-and-swap on the `.seq` object with S3 conditional
writes (If-Match / If-None-Match), and meta.json is written If-None-Match, so replicas
uploading at once get distinct versions. A service that answers 501 to conditional writes
is used without them (logged once): then one writer at a time per adapter name is assumed.
A failed put burns its version number (numbers grow; gaps are harmless).

`get()` returns a local directory (the loader reads files): each version is downloaded once
into an AdapterCache, verified against the sha256 recorded at upload before it appears there.
`describe()` and `read_file()` read metadata and small files without downloading a version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .adapter_cache import AdapterCache
from .errors import AdapterError, AdapterNotFound
from .s3_claims import release, same_or_claim
from .s3_client import S3Client, StoreUnavailableError
# The local store's rules and formats, so both stores accept and describe the same adapters.
from .store import (_NAME, _VERSION_DIR, META_FILE, StoredAdapter, _from_meta, allowed_file_name, check_name,
                    checked_upload_dir, copy_upload_files, files_digest)

__all__ = ["S3AdapterStore", "StoreUnavailableError"]

log = logging.getLogger(__name__)
_SEQ = ".seq"
_CLAIMS = ".claims"
_CHUNK = 1 << 20
_MAX_REMEMBERED_METAS = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


class S3AdapterStore:
    def __init__(self, bucket: str, prefix: str = "loragate/adapters", *, cache_dir: str | Path,
                 endpoint_url: str | None = None, max_cache_bytes: int | None = None,
                 max_total_bytes: int | None = None, client=None):
        self.s3 = S3Client(bucket, endpoint_url, client)
        self.prefix = prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.max_total_bytes = max_total_bytes
        self.cache = AdapterCache(cache_dir, max_cache_bytes)
        # Parsed meta.json of versions seen in a listing: immutable, so listing again costs one LIST.
        self._metas: OrderedDict[tuple[str, str, int], tuple[StoredAdapter, dict]] = OrderedDict()
        self._metas_lock = threading.Lock()

    def check_access(self) -> None:
        self.s3.check_bucket()

    # -- writes ----------------------------------------------------------------------------

    def put(self, tenant: str, name: str, src_dir: str | Path, *, reuse_same: bool = False) -> StoredAdapter:
        src = checked_upload_dir(tenant, name, src_dir)
        # Staged on the cache's filesystem: what is hashed is what is uploaded, and afterwards
        # the staged copy becomes this server's cache entry (no download of its own upload).
        staged, written, claim = self.cache.staging_dir(), [], None
        try:
            # Stricter names than the local store's: they become S3 keys, then local paths again.
            files = copy_upload_files(src, staged, self.max_total_bytes, _safe_file_name)
            digest = files_digest(files)
            if reuse_same:  # s3_claims.py: servers putting these files at once store them once
                key = self._claim_key(tenant, name, digest)
                same = same_or_claim(self.s3, key, lambda: self._latest_if_same(tenant, name, digest))
                if same is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                    return same
                claim = key
            version = self._allocate_version(tenant, name)
            prefix = self._version_prefix(tenant, name, version)
            for file, _, _ in files:
                written.append(prefix + file)
                self.s3.upload(staged / file, prefix + file)
            meta = {"tenant": tenant, "name": name, "version": version, "sha256": digest, "created": time.time(),
                    "files": [{"name": n, "sha256": h, "size": s} for n, h, s in files]}
            body = json.dumps(meta, indent=1).encode()
            (staged / META_FILE).write_bytes(body)
            written.append(prefix + META_FILE)
            if not self.s3.put(prefix + META_FILE, body, if_none_match=True):  # the version appears here
                # Only possible when the sequence was not compare-and-swapped: the keys are
                # the other writer's now, so remove none of them.
                written.clear()
                raise StoreUnavailableError(f"version {version} of {tenant}/{name} was published by another server "
                                            "at the same time; retry the upload")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            for key in reversed(written):  # meta.json first: a version is never visible half-deleted
                self.s3.delete_quietly(key)
            if claim is not None:  # another server may store these files now
                release(self.s3, claim)
            raise
        if claim is not None:
            release(self.s3, claim)
        self._remember(tenant, name, version, meta)
        try:
            return self.cache.publish(staged, tenant, name, version)
        except OSError as e:  # the upload is durable; the cache only spares a download
            log.warning("adapter cache: cannot keep %s/%s@%d: %s", tenant, name, version, e)
            shutil.rmtree(staged, ignore_errors=True)
            return _from_meta(meta, self.cache.path(tenant, name, version))

    def delete(self, tenant: str, name: str) -> None:
        check_name("tenant", tenant)
        check_name("adapter", name)
        rows = self._scan(self._adapter_prefix(tenant, name))
        versions = sorted({v for _, _, v, f, _, _ in rows if f == META_FILE})
        if not versions:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        self._raise_seq_to(tenant, name, versions[-1])  # remembered before anything disappears
        # Oldest first: until the last delete, readers still see the latest version.
        for v in versions:
            self.s3.delete(self._version_prefix(tenant, name, v) + META_FILE)
        published = set(versions)
        self.s3.delete_many([key for _, _, v, f, key, _ in rows if v in published and f != META_FILE])
        self.cache.discard(tenant, name)
        with self._metas_lock:
            for key in [k for k in self._metas if k[:2] == (tenant, name)]:
                del self._metas[key]

    def sweep_incomplete(self, older_than_s: float = 86400.0) -> int:
        """Delete the files of versions whose meta.json never appeared (a put that crashed),
        once they are older than any upload could still be running; returns how many."""
        by_version: dict[tuple[str, str, int], list] = {}
        for t, n, v, f, key, modified in self._scan(self._base):
            by_version.setdefault((t, n, v), []).append((f, key, modified.timestamp()))
        cutoff, stale = time.time() - older_than_s, []
        for objects in by_version.values():
            if all(f != META_FILE and modified < cutoff for f, _, modified in objects):
                stale.extend(key for _, key, _ in objects)
        self.s3.delete_many(stale)
        return len(stale)

    # -- reads -----------------------------------------------------------------------------

    def get(self, tenant: str, name: str, version: int | None = None) -> StoredAdapter:
        """A version as a local directory, downloaded into the cache on first use."""
        _check(tenant, name, version)
        if version is not None and (hit := self.cache.lookup(tenant, name, version)) is not None:
            return hit  # versions are immutable: no need to ask S3
        stored, meta = self._find(tenant, name, version)
        hit = self.cache.lookup(tenant, name, stored.version)
        return hit if hit is not None else self._download(stored, meta)

    def describe(self, tenant: str, name: str, version: int | None = None) -> StoredAdapter:
        """A version's metadata without downloading it (its `path` is where get() puts it)."""
        _check(tenant, name, version)
        return self._find(tenant, name, version)[0]

    def read_file(self, stored: StoredAdapter, file: str, max_bytes: int) -> bytes:
        """Up to max_bytes of one file of a version, from the cache or else from S3."""
        if file not in stored.files:
            raise AdapterError("missing_file", f"{file} is missing from the stored adapter")
        local = self.cache.peek(stored.tenant, stored.name, stored.version)
        if local is not None:
            with open(local.path / file, "rb") as f:
                return f.read(max_bytes)
        data = self.s3.get_bytes(self._version_prefix(stored.tenant, stored.name, stored.version) + file, max_bytes)
        if data is None:
            raise AdapterNotFound(f"adapter {stored.name!r} does not exist")
        return data

    def versions(self, tenant: str, name: str) -> list[StoredAdapter]:
        """Every version's metadata, oldest first (nothing is downloaded)."""
        _check(tenant, name, None)
        found = [f[0] for f in (self._meta(tenant, name, v, listed=True) for v in self._versions(tenant, name))
                 if f is not None]
        if not found:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return found

    def list(self, tenant: str) -> list[StoredAdapter]:
        """The latest version of each of the tenant's adapters, by name."""
        check_name("tenant", tenant)
        return self._latest(self._scan(f"{self._base}{tenant}/"))

    def list_all(self) -> list[StoredAdapter]:
        return self._latest(self._scan(self._base))

    # -- internals -------------------------------------------------------------------------

    def _find(self, tenant: str, name: str, version: int | None) -> tuple[StoredAdapter, dict]:
        if version is None:
            versions = self._versions(tenant, name)
            if not versions:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            found = self._meta(tenant, name, versions[-1], listed=True)
        else:
            found = self._meta(tenant, name, version, listed=False)
        if found is None:
            has_versions = version is not None and self._versions(tenant, name)
            what = f"version {version} of adapter {name!r}" if has_versions else f"adapter {name!r}"
            raise AdapterNotFound(f"{what} does not exist")
        return found

    def _latest_if_same(self, tenant: str, name: str, digest: str) -> StoredAdapter | None:
        """The latest version if it holds the files with this digest, else None."""
        try:
            latest = self._find(tenant, name, None)[0]
        except AdapterNotFound:
            return None
        return latest if latest.sha256 == digest else None

    def _adapter_prefix(self, tenant: str, name: str) -> str:
        return f"{self._base}{tenant}/{name}/"

    def _version_prefix(self, tenant: str, name: str, version: int) -> str:
        return f"{self._base}{tenant}/{name}/v{version}/"

    def _scan(self, prefix: str) -> list[tuple[str, str, int, str, str, object]]:
        """(tenant, name, version, file, key, last_modified) of the layout's objects under prefix."""
        rows = []
        for obj in self.s3.list(prefix):
            parts = obj["Key"][len(self._base):].split("/")
            if len(parts) == 4 and _NAME.fullmatch(parts[0]) and _NAME.fullmatch(parts[1]) \
                    and (m := _VERSION_DIR.fullmatch(parts[2])):
                rows.append((parts[0], parts[1], int(m[1]), parts[3], obj["Key"], obj["LastModified"]))
        return rows

    def _versions(self, tenant: str, name: str) -> list[int]:
        return sorted(v for _, _, v, f, _, _ in self._scan(self._adapter_prefix(tenant, name)) if f == META_FILE)

    def _latest(self, rows) -> list[StoredAdapter]:
        latest: dict[tuple[str, str], int] = {}
        for t, n, v, f, _, _ in rows:
            if f == META_FILE and v > latest.get((t, n), 0):
                latest[(t, n)] = v
        found = (self._meta(t, n, v, listed=True) for (t, n), v in sorted(latest.items()))
        return [f[0] for f in found if f is not None]

    def _meta(self, tenant: str, name: str, version: int, *, listed: bool) -> tuple[StoredAdapter, dict] | None:
        """A version's (metadata, meta.json), or None if it does not exist or is unreadable.
        Remembered only from a listing: a remembered version may have been deleted since."""
        key = (tenant, name, version)
        with self._metas_lock:
            if listed and key in self._metas:
                self._metas.move_to_end(key)
                return self._metas[key]
        raw = self.s3.get_bytes(self._version_prefix(tenant, name, version) + META_FILE)
        if raw is None:
            return None
        try:
            meta = _parse_meta(raw, key)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring s3://%s/%s: unreadable %s (%s)", self.s3.bucket,
                        self._version_prefix(*key), META_FILE, e)
            return None
        return self._remember(tenant, name, version, meta)

    def _remember(self, tenant: str, name: str, version: int, meta: dict) -> tuple[StoredAdapter, dict]:
        found = (_from_meta(meta, self.cache.path(tenant, name, version)), meta)
        with self._metas_lock:
            self._metas[(tenant, name, version)] = found
            while len(self._metas) > _MAX_REMEMBERED_METAS:
                self._metas.popitem(last=False)
        return found

    def _download(self, stored: StoredAdapter, meta: dict) -> StoredAdapter:
        tenant, name, version = stored.tenant, stored.name, stored.version
        prefix = self._version_prefix(tenant, name, version)
        staged = self.cache.staging_dir()
        try:
            lines = []
            for f in meta["files"]:
                got = self.s3.download(prefix + f["name"], staged / f["name"])
                if got is None:  # deleted while we read it
                    raise AdapterNotFound(f"adapter {name!r} does not exist")
                if got != (f["sha256"], f["size"]):
                    raise AdapterError("invalid_weights", f"{f['name']} in S3 does not match the sha256 recorded "
                                                          f"at upload of {tenant}/{name}@{version}; refusing it")
                lines.append(f"{f['sha256']}  {f['name']}\n")
            if hashlib.sha256("".join(lines).encode()).hexdigest() != meta["sha256"]:
                raise AdapterError("invalid_weights", f"the file list of {tenant}/{name}@{version} does not match "
                                                      "its recorded sha256; refusing it")
            (staged / META_FILE).write_text(json.dumps(meta, indent=1))
            return self.cache.publish(staged, tenant, name, version)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def _seq_key(self, tenant: str, name: str) -> str:
        return f"{self._base}{_SEQ}/{tenant}/{name}"

    def _claim_key(self, tenant: str, name: str, digest: str) -> str:
        return f"{self._base}{_CLAIMS}/{tenant}/{name}/{digest}"

    def _allocate_version(self, tenant: str, name: str) -> int:
        """One more than both the sequence object and the highest stored version (the
        sequence may be missing for adapters copied in by hand)."""
        def next_version(current: int) -> int:
            versions = self._versions(tenant, name)
            return max(current, versions[-1] if versions else 0) + 1
        return self.s3.update_counter(self._seq_key(tenant, name), next_version)

    def _raise_seq_to(self, tenant: str, name: str, version: int) -> None:
        self.s3.update_counter(self._seq_key(tenant, name), lambda current: None if current >= version else version)


def _check(tenant: str, name: str, version) -> None:
    check_name("tenant", tenant)
    check_name("adapter", name)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise AdapterError("invalid_name", f"version must be a positive integer, got {version!r}")


def _safe_file_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and allowed_file_name(name))


def _parse_meta(raw: bytes, key: tuple[str, str, int]) -> dict:
    """meta.json as the store wrote it; checked because its file names become local paths."""
    meta = json.loads(raw)
    if (meta["tenant"], meta["name"], meta["version"]) != key or not _SHA256.fullmatch(meta["sha256"]):
        raise ValueError(f"it describes {meta['tenant']}/{meta['name']}@{meta['version']}, not {key}")
    float(meta["created"])
    for f in meta["files"]:
        if not (_safe_file_name(f["name"]) and f["name"] != META_FILE and _SHA256.fullmatch(f["sha256"])
                and isinstance(f["size"], int) and f["size"] >= 0):
            raise ValueError(f"bad file entry {f!r}")
    return meta
