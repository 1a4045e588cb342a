"""Claim once, take over when stale: the record that says "this process does it".

A claim is a small JSON object created with the store's create-once write, so of any
number of racing claimants exactly one creates it. Its holder may die before finishing
(a scan killed mid-submit, say), so a claim older than its owner's limit can be taken
over. The takeover deletes the old record and claims afresh; the store has no
compare-and-delete, so two takers of the same stale claim at the same moment may both
win. Stale claims come from crashed processes, so that race is rare, and each caller keeps
what it does idempotent anyway (the inbox's submit goes through an idempotency key).

Used by submit idempotency keys (jobs/submit.py), inbox markers (jobs/inbox.py) and retry
rounds (jobs/retry.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs.manifest import utc_now
from jobs.store import NotFound, Store, get_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    won: bool  # this call created the record (or took a stale one over)
    record: dict[str, Any]  # what is at the key: this call's record if won, else the holder's


def claim(store: Store, key: str, record: dict[str, Any], stale_seconds: float, *,
          stamp: str = "claimed_at",
          abandoned: Callable[[dict[str, Any]], bool] = lambda held: True) -> Claim:
    """Create record at key, with `stamp` set to now, unless a record is already there.

    A record already there is taken over when its `stamp` is over stale_seconds old and
    abandoned(record) agrees that its holder died (say, it never got as far as its next
    step); otherwise it is returned as the holder's.
    """
    while True:
        try:
            held = get_json(store, key)
        except NotFound:
            mine = {**record, stamp: utc_now()}
            if store.create_once(key, json.dumps(mine, sort_keys=True).encode()):
                return Claim(True, mine)
            continue  # another claimant won the race: read its record
        if _age_seconds(held[stamp]) <= stale_seconds or not abandoned(held):
            return Claim(False, held)
        log.warning("taking over %s: its claim went stale", key)
        store.delete(key)


def _age_seconds(stamp: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
