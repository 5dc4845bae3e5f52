"""Upload claims for S3AdapterStore.put(reuse_same=True): servers putting the same new files
at once (a StatefulSet's engines starting together with one --lora-modules) agree on one
writer. The first to create `.claims/<tenant>/<name>/<sha256 of the files>` (If-None-Match)
uploads; the others wait for its version and use it. The claim holds its creation time: one
older than CLAIM_WAIT_S (its server died or stalls) is taken over, as is one that outlasts
that wait, so a crash costs at most one wait. A service without conditional writes lets every
server claim (each then stores its own version, as without claims)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .s3_client import S3Client, StoreUnavailableError

log = logging.getLogger(__name__)

CLAIM_WAIT_S = 120.0  # longest a server waits for another's upload of the same files
CLAIM_POLL_S = 0.5


def same_or_claim(s3: S3Client, claim: str, same: Callable[[], object | None]):
    """`same()` (the stored version holding these files, or None) once it finds one, else None
    once this server holds `claim` and is to upload them."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        found = same()
        if found is not None:
            return found
        if s3.put(claim, str(time.time()).encode(), if_none_match=True):
            # Look again: a claimant may have published and let go since the check above.
            try:
                found = same()
            except BaseException:
                release(s3, claim)
                raise
            if found is not None:
                release(s3, claim)
            return found
        held_since = _float_or_none(s3.get_bytes(claim, 64))
        if time.monotonic() >= deadline or (held_since is not None and time.time() - held_since > CLAIM_WAIT_S):
            log.warning("taking over s3://%s/%s from a server that claimed it and did not finish", s3.bucket, claim)
            s3.put(claim, str(time.time()).encode())
            return None
        time.sleep(CLAIM_POLL_S)


def release(s3: S3Client, claim: str) -> None:
    try:
        s3.delete(claim)
    except StoreUnavailableError as e:  # others take it over once it is CLAIM_WAIT_S old
        log.warning("could not remove the upload claim s3://%s/%s: %s", s3.bucket, claim, e)


def _float_or_none(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None
