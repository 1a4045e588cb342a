"""The object store: one small interface over a local folder (file://) and S3 (s3://).

Keys are relative to the store's root ("jobs/<id>/spec.json"). Writes are atomic: the
object is written under a temporary key beside its final one and then published (renamed
on disk, copied on S3), so a reader sees all of an object or none of it. Temporary keys
start with "." and so are never valid keys: `list` never shows them, not even the ones
a crashed writer left behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

from engine.s3 import s3_client
from jobs.errors import UserError

TEMP_MARK = ".tmp-"
# Objects above this size go up and are copied in parts (8 MiB is S3's usual choice).
MULTIPART_BYTES = 8 * 1024 * 1024
# Enough to make one ranged GET worth its round trip without reading far past a column chunk.
RANGE_READ_BUFFER_BYTES = 256 * 1024


class NotFound(KeyError):
    """The key does not exist in the store."""


def check_key(key: str) -> str:
    """Return key if it is a safe relative key, else raise ValueError.

    Safe: "/"-separated non-empty segments, none starting with "." (which rules out "." and
    ".." and reserves dot names for temporary objects), no backslashes or control characters.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}")
    for segment in key.split("/"):
        if (not segment or segment.startswith(".") or "\\" in segment
                or any(ord(ch) < 32 for ch in segment)):
            raise ValueError(f"invalid object key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: "" (everything), a folder ("jobs/"), or the start of a key."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def _is_hidden(relative_key: str) -> bool:
    return any(segment.startswith(".") for segment in relative_key.split("/"))


def _temp_key(key: str) -> str:
    folder, _, name = key.rpartition("/")
    temp_name = f"{TEMP_MARK}{uuid.uuid4().hex}-{name}"
    return f"{folder}/{temp_name}" if folder else temp_name


class Store(ABC):
    """What the jobs layer needs from object storage; see open_store."""

    url: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write an object atomically (replacing any old one)."""

    @abstractmethod
    def create_once(self, key: str, data: bytes) -> bool:
        """Write an object only if nothing is at key; True if this call created it.

        Of any number of racing callers exactly one wins, and readers see the object whole.
        (S3: PutObject with If-None-Match: *; a folder: link(2), which never replaces.)
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; NotFound if it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key starting with prefix, sorted."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """The names of the folders directly under prefix (a folder, "" or ending in "/"), sorted.

        Lets `jobs` list job folders without listing every part file of every job.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    @abstractmethod
    def upload_file(self, local_path: str | Path, key: str) -> None:
        """Copy a local file into the store atomically (in parts on S3)."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | Path) -> None:
        """Copy an object to a local file; NotFound if it does not exist."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A seekable binary file over the object (ranged reads on S3), e.g. for pyarrow."""

    @abstractmethod
    def etag(self, key: str) -> str:
        """A tag that changes whenever the object is rewritten; NotFound if missing."""


def put_json(store: Store, key: str, value: Any) -> None:
    store.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())


def get_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def open_store(url: str) -> Store:
    """The store at "s3://bucket/prefix" or "file:///abs/path" / "file://./relative"."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Store(bucket, prefix.strip("/"))
    if url.startswith("file://"):
        return FileStore(url.removeprefix("file://"))
    raise UserError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path")


class FileStore(Store):
    """A folder on a local or shared filesystem."""

    def __init__(self, root: str | Path) -> None:
        if not str(root):
            raise UserError("a file:// store URL needs a path")
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # check_key rules out "..", but a symlink inside the root could still lead out of it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key {key!r} resolves outside the store root")
        return path

    def _publish(self, path: Path, write_temp) -> None:
        """Write through write_temp(temp_path), then rename over path (atomic on POSIX)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex}-{path.name}")
        try:
            write_temp(temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        def write(temp: Path) -> None:
            with open(temp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # the rename must never publish unwritten data

        self._publish(self._path(key), write)

    def create_once(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temp file linked to the final name: link(2) is atomic and fails if the
        # name exists, so the write is exclusive and never seen half-done.
        temp = path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex}-{path.name}")
        try:
            with open(temp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.link(temp, path)
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names, not the whole store.
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and not _is_hidden(key):
                    keys.append(key)
        return sorted(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        folder = self.root / check_prefix(prefix)
        if not folder.is_dir():
            return []
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._publish(self._path(key), lambda temp: shutil.copyfile(local_path, temp))

    def download_file(self, key: str, local_path: str | Path) -> None:
        try:
            shutil.copyfile(self._path(key), local_path)
        except FileNotFoundError:
            raise NotFound(key) from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(key) from None

    def etag(self, key: str) -> str:
        # Size and modification time: cheap, and a rewrite (a rename of a new file) changes it.
        try:
            info = self._path(key).stat()
        except FileNotFoundError:
            raise NotFound(key) from None
        return f"{info.st_size:x}-{info.st_mtime_ns:x}"


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
        temp = _temp_key(full)
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
        return sorted(key for key in keys if not _is_hidden(key))

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
