"""The object store on S3 or an S3-compatible server (s3:// URLs: MinIO, moto)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from engine.s3 import s3_client
from jobs.errors import UserError
from jobs.store import NotFound, Store, check_key, check_prefix, is_hidden, temp_key

# Objects above this size go up and are copied in parts (8 MiB is S3's usual choice).
MULTIPART_BYTES = 8 * 1024 * 1024
# Enough to make one ranged GET worth its round trip without reading far past a column chunk.
RANGE_READ_BUFFER_BYTES = 256 * 1024


def _is_not_found(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return (isinstance(error, ClientError)
            and error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"))


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

    def _publish(self, key: str, size: int, write_temp) -> None:
        """Write through write_temp(temp_full_key), then copy to the final key and drop the temp."""
        full = self._full(check_key(key))
        temp = temp_key(full)
        source = {"Bucket": self.bucket, "Key": temp}
        try:
            write_temp(temp)
            if size < MULTIPART_BYTES:
                self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=full)
            else:
                # A copy in parts: CopyObject alone stops at 5 GB.
                self.client.copy(source, self.bucket, full, Config=self._transfer)
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=temp)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, len(data), lambda temp: self.client.put_object(
            Bucket=self.bucket, Key=temp, Body=data))

    def create_once(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(check_key(key)), Body=data,
                                   IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _LOST_RACE_CODES:
                return False
            raise
        return True

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._publish(key, os.path.getsize(local_path), lambda temp: self.client.upload_file(
            str(local_path), self.bucket, temp, Config=self._transfer))

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
        head = self._head(key)
        raw = _S3RangeReader(self.client, self.bucket, self._full(key),
                             size=head["ContentLength"], etag=head["ETag"])
        return io.BufferedReader(raw, buffer_size=RANGE_READ_BUFFER_BYTES)

    def etag(self, key: str) -> str:
        return self._head(key)["ETag"].strip('"')


class _S3RangeReader(io.RawIOBase):
    """A read-only seekable file over one S3 object: each read is one ranged GET.

    Every GET carries If-Match with the ETag seen at open, so an object replaced while it
    is being read fails loudly (412) instead of yielding a mix of two versions.
    """

    def __init__(self, client, bucket: str, full_key: str, *, size: int, etag: str) -> None:
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, full_key
        self._size, self._etag = size, etag
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
        response = self._client.get_object(
            Bucket=self._bucket, Key=self._key, IfMatch=self._etag,
            Range=f"bytes={self._position}-{end - 1}")
        data = response["Body"].read()
        view[:len(data)] = data
        self._position += len(data)
        return len(data)
