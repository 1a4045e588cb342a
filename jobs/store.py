"""The object store: one small interface over a local folder (file://) and S3 (s3://).

Keys are relative to the store's root ("jobs/<id>/spec.json"). Writes are atomic: a
reader sees all of an object or none of it. On disk an object is written to a temporary
file beside its final name and renamed (a file being written can be read half-done); on
S3 a PutObject is atomic by itself, so it goes straight to its key. Temporary names start
with "." and so are never valid keys: `list` never shows them, not even the ones a
crashed writer left behind (or an S3 writer from before writes went straight to the key).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from jobs.errors import UserError

TEMP_MARK = ".tmp-"


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


def is_hidden(relative_key: str) -> bool:
    return any(segment.startswith(".") for segment in relative_key.split("/"))


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
    def update(self, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Replace the object with change(its bytes, None if absent) and return what was
        written; a read-modify-write that racing updaters never lose each other's part of
        (change may be called again, with what another updater wrote: keep it pure).

        (S3: a conditional PutObject, If-Match the ETag read, tried again when it loses;
        a folder: a lock on the object's folder around the read and the write.)
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


def json_bytes(value: Any) -> bytes:
    """value as the store's JSON objects are written (put_json, read-modify-writes)."""
    return json.dumps(value, indent=2, sort_keys=True).encode()


def put_json(store: Store, key: str, value: Any) -> None:
    store.put_bytes(key, json_bytes(value))


def get_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def open_store(url: str) -> Store:
    """The store at "s3://bucket/prefix" or "file:///abs/path" / "file://./relative"."""
    # Here, not at the top: each kind of store builds on this module's interface.
    from jobs.file_store import FileStore
    from jobs.s3_store import S3Store

    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Store(bucket, prefix.strip("/"))
    if url.startswith("file://"):
        return FileStore(url.removeprefix("file://"))
    raise UserError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path")
