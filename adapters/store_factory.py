"""Build the adapter store a server was configured with: a local directory, or an S3 bucket
shared by every engine (with a local read-through cache), checked at start-up."""

from __future__ import annotations

import logging
from pathlib import Path

from .store import AdapterStore, LocalAdapterStore

__all__ = ["STORE_KINDS", "make_adapter_store"]

log = logging.getLogger(__name__)
STORE_KINDS = ("local", "s3")


def make_adapter_store(kind: str, home: str | Path, *, s3_bucket: str | None = None,
                       s3_prefix: str = "loragate/adapters", s3_endpoint_url: str | None = None,
                       cache_max_bytes: int | None = None) -> AdapterStore:
    """`home` holds the local store (`home/adapters`) or the S3 store's cache
    (`home/adapter-cache/<endpoint>/<bucket>/<prefix>`, so two buckets never share entries).

    For S3 the bucket is probed now, so a wrong name, missing credentials or an unreachable
    endpoint is one clear StoreUnavailableError at start-up rather than a failure per request;
    uploads that crashed over a day ago are swept then too."""
    home = Path(home)
    if kind == "local":
        return LocalAdapterStore(home / "adapters")
    if kind != "s3":
        raise ValueError(f"adapter store must be one of {', '.join(STORE_KINDS)}, got {kind!r}")
    if not s3_bucket:
        raise ValueError("the s3 adapter store needs a bucket (--s3-bucket / LORAGATE_S3_BUCKET)")
    from .s3_store import S3AdapterStore

    endpoint = (s3_endpoint_url or "aws").split("://")[-1].replace("/", "_").replace(":", "_")
    cache_dir = home / "adapter-cache" / endpoint / s3_bucket / (s3_prefix.strip("/") or "_root")
    store = S3AdapterStore(s3_bucket, s3_prefix, cache_dir=cache_dir, endpoint_url=s3_endpoint_url,
                           max_cache_bytes=cache_max_bytes)
    store.check_access()
    swept = store.sweep_incomplete()
    if swept:
        log.warning("removed %d objects of uploads that never completed from s3://%s/%s", swept, s3_bucket, s3_prefix)
    return store
