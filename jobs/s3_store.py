"""The object store on S3 or an S3-compatible server (s3:// URLs: MinIO, moto)."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from engine.s3 import s3_client
from jobs.errors import UserError
from jobs.store import NotFound, Store, check_key, check_prefix, is_hidden

# Objects above this size go up in parts (8 MiB is S3's usual choice).
MULTIPART_BYTES = 8 * 1024 * 1024
# A conditional update that keeps losing to other writers gives up after this many tries
# (each pauses up to twice as long as the last, from this, at most a second).
UPDATE_TRIES = 50
UPDATE_BACKOFF_SECONDS = 0.01
# Enough to make one ranged GET worth its round trip without reading far past a column chunk.
RANGE_READ_BUFFER_BYTES = 256 * 1024


def _is_not_found(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return (isinstance(error, ClientError)
            and error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"))


def _is_invalid_range(error: Exception) -> bool:
    """S3's answer to a ranged GET of an empty object (416)."""
    from botocore.exceptions import ClientError

    return (isinstance(error, ClientError)
            and error.response.get("Error", {}).get("Code") == "InvalidRange")


# S3's answers to a conditional put that lost: the key exists (412), or another
# conditional write to it is in flight (409).
_LOST_RACE_CODES = ("PreconditionFailed", "ConditionalRequestConflict")

class S3Store(Store):
    """A bucket (and optional prefix) on S3 or an S3-compatible server (MinIO, moto).

    The endpoint comes from AWS_ENDPOINT_URL, credentials from the usual AWS variables.
    Transient errors (throttling, 5xx, dropped connections) are retried with exponential
    backoff by botocore's "standard" retry mode (engine/s3.py makes the client).
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise UserError("an s3:// store URL needs a bucket: s3://bucket/prefix")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        # Public so that callers (and tests) can observe requests through client.meta.events.
        self.client = s3_client()
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES,
                                        multipart_chunksize=MULTIPART_BYTES)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    # S3 needs no temporary key: a PutObject (or a multipart upload, at its
    # CompleteMultipartUpload) makes the object appear whole or not at all, and a failed
    # one leaves nothing behind. A copy from a temporary key would add nothing to that but
    # two requests (CopyObject, DeleteObject). Exactly-once for parts does not rest on how
    # an object is written but on the results part being written last and a shard whose
    # part exists doing nothing (jobs/runner.py).
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._full(check_key(key)), Body=data)

    def create_once(self, key: str, data: bytes) -> bool:
        return self._put_if(self._full(check_key(key)), data, {"IfNoneMatch": "*"})

    def update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        full = self._full(check_key(key))
        for attempt in range(UPDATE_TRIES):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=full)
                current, condition = response["Body"].read(), {"IfMatch": response["ETag"]}
            except Exception as error:
                if not _is_not_found(error):
                    raise
                current, condition = None, {"IfNoneMatch": "*"}
            data = change(current)
            if self._put_if(full, data, condition):
                return data
            # Another updater won: read what it wrote, after a pause that spreads the racers.
            time.sleep(random.uniform(0, min(UPDATE_BACKOFF_SECONDS * 2 ** attempt, 1.0)))
        # A TimeoutError is transient (jobs/faults.py): the caller tries again later.
        raise TimeoutError(f"{key}: still losing to other writers after {UPDATE_TRIES} tries")

    def _put_if(self, full_key: str, data: bytes, condition: dict) -> bool:
        """PutObject under condition (If-None-Match or If-Match); False if it lost the race,
        or the object it was to replace was deleted meanwhile."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data, **condition)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in (*_LOST_RACE_CODES, "NoSuchKey"):
                return False
            raise
        return True

    def upload_file(self, local_path: str | Path, key: str) -> None:
        # In parts above MULTIPART_BYTES; boto3 aborts a multipart upload that fails.
        self.client.upload_file(str(local_path), self.bucket, self._full(check_key(key)),
                                Config=self._transfer)

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(check_key(key)))
        except Exception as error:
            if _is_not_found(error):
                raise NotFound(key) from None
            raise
        return response["Body"].read()

    def _head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(check_key(key)))
        except Exception as error:
            if _is_not_found(error):
                raise NotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFound:
            return False
        return True

    def _pages(self, prefix: str, **options):
        check_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        return paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, **options)

    def list(self, prefix: str) -> list[str]:
        keys = [self._relative(item["Key"])
                for page in self._pages(prefix) for item in page.get("Contents", [])]
        return sorted(key for key in keys if not is_hidden(key))

    def list_dirs(self, prefix: str) -> list[str]:
        names = [self._relative(common["Prefix"])[len(prefix):].rstrip("/")
                 for page in self._pages(prefix, Delimiter="/")
                 for common in page.get("CommonPrefixes", [])]
        return sorted(name for name in names if name and not name.startswith("."))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(check_key(key)))

    def download_file(self, key: str, local_path: str | Path) -> None:
        try:
            self.client.download_file(self.bucket, self._full(check_key(key)), str(local_path),
                                      Config=self._transfer)
        except Exception as error:
            if _is_not_found(error):
                raise NotFound(key) from None
            raise

    def open_read(self, key: str) -> BinaryIO:
        # The first request reads the object's tail, not its HEAD: its Content-Range gives
        # the size and its ETag the version, and a Parquet reader starts at the footer, so
        # a small object (a shard's row groups, a part) needs no other request at all.
        full = self._full(check_key(key))
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full,
                                              Range=f"bytes=-{RANGE_READ_BUFFER_BYTES}")
        except Exception as error:
            if _is_not_found(error):
                raise NotFound(key) from None
            if not _is_invalid_range(error):
                raise
            return io.BytesIO(b"")  # an empty object has no tail to range over
        tail = response["Body"].read()
        # "bytes 10-99/100"; without it (an empty object, on some servers) the answer is whole.
        content_range = response.get("ContentRange")
        size = int(content_range.rpartition("/")[2]) if content_range else len(tail)
        raw = _S3RangeReader(self.client, self.bucket, full, size=size, etag=response["ETag"],
                             tail=tail)
        return io.BufferedReader(raw, buffer_size=RANGE_READ_BUFFER_BYTES)

    def etag(self, key: str) -> str:
        return self._head(key)["ETag"].strip('"')


class _S3RangeReader(io.RawIOBase):
    """A read-only seekable file over one S3 object: its tail, read at open, then one
    ranged GET per read before it.

    Every GET carries If-Match with the ETag seen at open, so an object replaced while it
    is being read fails loudly (412) instead of yielding a mix of two versions.
    """

    def __init__(self, client, bucket: str, full_key: str, *, size: int, etag: str,
                 tail: bytes) -> None:
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, full_key
        self._size, self._etag = size, etag
        self._tail, self._tail_start = tail, size - len(tail)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._position + len(view), self._size)
        if end <= self._position:
            return 0
        if self._position >= self._tail_start:
            data = self._tail[self._position - self._tail_start:end - self._tail_start]
        else:  # up to the tail at most: a short read, which the buffered reader continues
            response = self._client.get_object(
                Bucket=self._bucket, Key=self._key, IfMatch=self._etag,
                Range=f"bytes={self._position}-{min(end, self._tail_start) - 1}")
            data = response["Body"].read()
        view[:len(data)] = data
        self._position += len(data)
        return len(data)
