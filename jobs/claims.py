"""Create-once objects: the one write in the store that two racing processes cannot both win.

The nightly inbox scan claims each file this way, so that two scans running at the same
time (a slow scan overlapping the next, two beat schedulers by mistake) submit it once;
submit idempotency keys use it too. It is part of the Store interface
(`Store.create_once`); this function remains for the callers that import it from here.
"""

from __future__ import annotations

from jobs.store import Store


def create_once(store: Store, key: str, data: bytes) -> bool:
    """Write data at key only if nothing is there; True if this call created it.

    The object appears whole (never empty or partly written) to readers.
    """
    return store.create_once(key, data)
