"""Files and batch records of the OpenAI API in the object store, per owner.

```
openai/files/<file_id>/file.json       the file object (OpenAI's fields) and its owner
openai/files/<file_id>/content         the bytes as uploaded (or as rendered)
openai/batches/<batch_id>.json         the batch record: request fields, owner, job id, times
openai/owners/<owner>/files/<order>    empty: lists an owner's files newest first
openai/owners/<owner>/batches/<order>  the same for batches
```

`<order>` is the creation time (in nanoseconds) counted down from a far date, then the
id, so a listing
of the prefix is newest first and a cursor is a key to start after. Ids are random
(`file-<hex>`, `batch_<hex>`) and checked before they become part of a key.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from jobs.store import NotFound, Store, get_json, put_json

PREFIX = "openai/"
# Nanoseconds before this moment (about the year 2286) order listings newest first.
_FAR_NS = 10**19
_FILE_ID = re.compile(r"file-[0-9a-f]{32}")
_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


class NotFoundForOwner(LookupError):
    """No such object, or it belongs to another key (the same answer, on purpose)."""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def file_key(file_id: str) -> str:
    return f"{PREFIX}files/{file_id}/file.json"


def content_key(file_id: str) -> str:
    return f"{PREFIX}files/{file_id}/content"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}batches/{batch_id}.json"


def _index_prefix(owner: str, kind: str) -> str:
    return f"{PREFIX}owners/{owner}/{kind}/"


def _index_name(object_id: str) -> str:
    return f"{_FAR_NS - time.time_ns():020d}-{object_id}"


def now() -> int:
    return int(time.time())


def save_new(store: Store, kind: str, record: dict[str, Any]) -> None:
    """Store a new file or batch record and list it under its owner."""
    key = file_key(record["id"]) if kind == "files" else batch_key(record["id"])
    record["_index"] = _index_prefix(record["owner"], kind) + _index_name(record["id"])
    put_json(store, key, record)
    store.put_bytes(record["_index"], b"")


def save(store: Store, record: dict[str, Any]) -> None:
    key = batch_key(record["id"]) if record["object"] == "batch" else file_key(record["id"])
    put_json(store, key, record)


def load(store: Store, kind: str, object_id: str, owner: str) -> dict[str, Any]:
    """The record of owner's file or batch; NotFoundForOwner when it is not theirs."""
    pattern, key = ((_FILE_ID, file_key) if kind == "files" else (_BATCH_ID, batch_key))
    if not pattern.fullmatch(object_id):
        raise NotFoundForOwner(object_id)
    try:
        record = get_json(store, key(object_id))
    except NotFound:
        raise NotFoundForOwner(object_id) from None
    if record.get("owner") != owner:
        raise NotFoundForOwner(object_id)
    return record


def remove(store: Store, record: dict[str, Any]) -> None:
    """Delete a file: its index entry first (it stops being listed), then its objects."""
    store.delete(record["_index"])
    store.delete(content_key(record["id"]))
    store.delete(file_key(record["id"]))


def page(store: Store, kind: str, owner: str, limit: int, after: str | None,
         keep: Callable[[dict[str, Any]], bool] = lambda record: True,
         ) -> tuple[list[dict[str, Any]], bool]:
    """Owner's records that keep accepts, newest first, at most limit after the one with
    id after; and whether more follow. An after that is not one of owner's ids gives an
    empty page: starting again from the newest would hand a client's loop duplicates."""
    prefix = _index_prefix(owner, kind)
    ids = [key.removeprefix(prefix).partition("-")[2] for key in store.list(prefix)]
    if after is not None and after not in ids:
        return [], False
    start = ids.index(after) + 1 if after is not None else 0
    records = []
    for object_id in ids[start:]:
        if len(records) == limit:
            return records, True
        try:
            record = load(store, kind, object_id, owner)
        except NotFoundForOwner:  # deleted between the listing and the read
            continue
        if keep(record):
            records.append(record)
    return records, False


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The object as the API shows it: without the fields only the server uses."""
    return {k: v for k, v in record.items() if not k.startswith("_") and k != "owner"}
