"""The few S3 operations the adapter store needs, over one boto3 client, with the service's
failures turned into StoreUnavailableError (an OSError: not the adapter's fault, retry later)
carrying a one-line message, and "absent" / "precondition failed" turned into return values.

boto3 is imported here only, when an S3 store is built: it is the optional `s3` extra.
Credentials and region come from boto3's standard sources (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION / AWS_REGION, ~/.aws, instance roles).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["S3Client", "StoreUnavailableError"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_CAS_ATTEMPTS = 20
_ABSENT = {"NoSuchKey", "404", "NotFound"}
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class StoreUnavailableError(OSError):
    """The S3 service could not be reached or refused the operation."""


class S3Client:
    def __init__(self, bucket: str, endpoint_url: str | None = None, client=None):
        self.bucket, self.endpoint_url = bucket, endpoint_url
        self.conditional_writes = True  # switched off once if the service answers 501 to them
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StoreUnavailableError("the S3 adapter store needs boto3: pip install 'loragate[s3]'") from None
            # Path-style addressing for custom endpoints: MinIO & co. rarely have per-bucket DNS names.
            config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                            s3={"addressing_style": "path"} if endpoint_url else None)
            # A session of its own: credentials are read from the environment now, not cached
            # in boto3's default session from whenever something first used it.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        self._ClientError, self._NoCredentials = ClientError, NoCredentialsError
        self._failures = (BotoCoreError, ClientError, _upload_failed_error())

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def check_bucket(self) -> None:
        """Raise StoreUnavailableError with a one-line reason unless the bucket is usable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._NoCredentials:
            raise StoreUnavailableError("no AWS credentials for the S3 adapter store: set AWS_ACCESS_KEY_ID and "
                                        "AWS_SECRET_ACCESS_KEY (or another boto3 credential source)") from None
        except self._ClientError as e:
            code = _code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreUnavailableError(f"S3 bucket {self.bucket!r} does not exist ({self.where}); create it first") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreUnavailableError(f"access to {self.where} denied ({code}): check the AWS credentials "
                                            "and the bucket policy") from None
            raise StoreUnavailableError(f"cannot use {self.where}: {_message(e)}") from None
        except self._failures as e:
            raise StoreUnavailableError(f"cannot reach {self.where}: {e}") from None

    def list(self, prefix: str) -> list[dict]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [obj for page in pages for obj in page.get("Contents", [])]
        except self._failures as e:
            raise self._unavailable("list", prefix, e) from None

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes (at most max_bytes), or None when it does not exist."""
        extra = {"Range": f"bytes=0-{max_bytes - 1}"} if max_bytes else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        except self._ClientError as e:
            if _code(e) in _ABSENT:
                return None
            if _code(e) == "InvalidRange":  # a Range over an empty object
                return b""
            raise self._unavailable("get", key, e) from None
        except self._failures as e:
            raise self._unavailable("get", key, e) from None

    def download(self, key: str, dst: Path) -> tuple[str, int] | None:
        """Stream the object into a new file dst; (sha256, size), or None when it does not exist."""
        h, size = hashlib.sha256(), 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with open(dst, "xb") as out:
                for chunk in body.iter_chunks(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except self._ClientError as e:
            if _code(e) in _ABSENT:
                return None
            raise self._unavailable("get", key, e) from None
        except self._failures as e:
            raise self._unavailable("get", key, e) from None
        return h.hexdigest(), size

    def upload(self, src: Path, key: str) -> None:
        try:  # upload_file: multipart for large files, aborted by s3transfer if it fails
            self.client.upload_file(str(src), self.bucket, key)
        except self._failures as e:
            raise self._unavailable("upload", key, e) from None

    def read_counter(self, key: str) -> tuple[int, str | None]:
        """(value, ETag) of a small integer object, (0, None) when absent."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            text = obj["Body"].read().decode("ascii", "replace").strip()
        except self._ClientError as e:
            if _code(e) in _ABSENT:
                return 0, None
            raise self._unavailable("get", key, e) from None
        except self._failures as e:
            raise self._unavailable("get", key, e) from None
        if not text.isdigit():
            log.warning("s3://%s/%s holds %r, not a version number; treating it as 0", self.bucket, key, text[:40])
            return 0, obj["ETag"]
        return int(text), obj["ETag"]

    def update_counter(self, key: str, new_value: Callable[[int], int | None]) -> int:
        """Compare-and-swap an integer object: write new_value(current) (absent counts as 0)
        unless another writer changed it since it was read, then try again. new_value
        returning None leaves the counter as it is. Returns the value in place."""
        for attempt in range(_CAS_ATTEMPTS):
            current, etag = self.read_counter(key)
            value = new_value(current)
            if value is None:
                return current
            if self.put(key, str(value).encode(), if_match=etag, if_none_match=etag is None):
                return value
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # another writer won this round
        raise StoreUnavailableError(f"s3://{self.bucket}/{key} kept changing under {_CAS_ATTEMPTS} attempts to "
                                    "update it (many servers uploading the same adapter at once); retry")

    def put(self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> bool:
        """Write the object; False when a condition failed (another writer got there first)."""
        conditions = {}
        if self.conditional_writes:
            conditions = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **conditions)
            return True
        except self._ClientError as e:
            if conditions and _code(e) in _LOST_RACE:
                return False
            if conditions and _code(e) in ("NotImplemented", "501"):
                log.warning("%s does not support conditional writes: version numbers are safe only with one "
                            "uploading server at a time", self.where)
                self.conditional_writes = False
                return self.put(key, body)
            raise self._unavailable("put", key, e) from None
        except self._failures as e:
            raise self._unavailable("put", key, e) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except self._failures as e:
            raise self._unavailable("delete", key, e) from None

    def delete_quietly(self, key: str) -> None:
        """Best effort, while already handling another failure."""
        try:
            self.delete(key)
        except StoreUnavailableError as e:
            log.warning("could not remove s3://%s/%s after a failed upload (invisible without its "
                        "meta.json; sweep_incomplete removes it later): %s", self.bucket, key, e)

    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's limit per request
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            try:
                errors = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors")
            except self._failures as e:
                raise self._unavailable("delete", batch[0]["Key"], e) from None
            if errors:
                raise StoreUnavailableError(f"S3 delete of s3://{self.bucket}/{errors[0].get('Key')} failed: "
                                            f"{errors[0].get('Code')} {errors[0].get('Message', '')}".strip())

    def _unavailable(self, op: str, key: str, e: Exception) -> StoreUnavailableError:
        reason = _message(e) if isinstance(e, self._ClientError) else str(e)
        return StoreUnavailableError(f"S3 {op} of s3://{self.bucket}/{key} failed: {reason}")


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _message(e) -> str:
    err = e.response.get("Error", {})
    return f"{err.get('Code', '?')} {err.get('Message', '')}".strip()


def _upload_failed_error() -> type[Exception]:
    from boto3.exceptions import S3UploadFailedError

    return S3UploadFailedError
