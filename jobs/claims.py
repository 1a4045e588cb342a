"""Create-once objects: the one write in the store that two racing processes cannot both win.

The nightly inbox scan claims each file this way, so that two scans running at the same
time (a slow scan overlapping the next, two beat schedulers by mistake) submit it once.
S3 (and MinIO, and moto) refuse a PutObject with `If-None-Match: *` when the key exists; on
a filesystem, link(2) refuses to replace an existing name.
"""

from __future__ import annotations

import os
import uuid

from jobs.store import TEMP_MARK, FileStore, S3Store, Store, check_key

# S3's answers to a conditional put that lost: the key exists (412), or another
# conditional write to it is in flight (409).
_LOST_RACE_CODES = ("PreconditionFailed", "ConditionalRequestConflict")


def create_once(store: Store, key: str, data: bytes) -> bool:
    """Write data at key only if nothing is there; True if this call created it.

    The object appears whole (never empty or partly written) to readers.
    """
    if isinstance(store, S3Store):
        return _create_once_s3(store, key, data)
    if isinstance(store, FileStore):
        return _create_once_file(store, key, data)
    raise TypeError(f"create_once does not support {type(store).__name__}")


def _create_once_s3(store: S3Store, key: str, data: bytes) -> bool:
    from botocore.exceptions import ClientError

    full_key = f"{store.prefix}/{check_key(key)}" if store.prefix else check_key(key)
    try:
        store.client.put_object(Bucket=store.bucket, Key=full_key, Body=data, IfNoneMatch="*")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _LOST_RACE_CODES:
            return False
        raise
    return True


def _create_once_file(store: FileStore, key: str, data: bytes) -> bool:
    path = store.root / check_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a hidden temp file, then link it to the final name: link(2) is atomic and fails
    # if the name exists, so the claim is exclusive and never seen half-written.
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
