"""Job expiry: finished jobs (completed, failed, cancelled) older than the retention are
deleted; jobs still validating, queued, running or finalizing never are. Usage records
stay (jobs/delete.py).

Beat runs it nightly (workers/nightly_tasks.py); `batchinfer nightly expire-jobs` runs it
by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from jobs import manifest
from jobs.delete import delete_job_objects
from jobs.errors import UserError
from jobs.settings import env_whole_number
from jobs.store import Store

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 30


def retention_days_from_env(environ: Mapping[str, str]) -> int:
    """BATCHINFER_RETENTION_DAYS (default DEFAULT_RETENTION_DAYS)."""
    return env_whole_number("BATCHINFER_RETENTION_DAYS", DEFAULT_RETENTION_DAYS, environ)


def expire_jobs(store: Store, retention_days: int, now: datetime | None = None) -> list[str]:
    """Delete finished jobs that ended (or, lacking an end, began) over retention_days ago.

    Returns the deleted job ids. Jobs that are not finished are never touched.
    """
    if retention_days < 1:
        raise UserError(f"retention must be at least 1 day, got {retention_days}")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    expired = []
    for job in manifest.list_manifests(store):
        # Read again just before deleting: a retry may have re-queued it since the listing.
        if _expired(job, cutoff) and _expired(manifest.load_manifest(store, job["job_id"]),
                                              cutoff):
            delete_job_objects(store, job["job_id"])
            log.info("job %s expired", job["job_id"])
            expired.append(job["job_id"])
    return expired


def _expired(job: dict[str, Any], cutoff: datetime) -> bool:
    stamp = job.get("finished_at") or job.get("created_at")
    return (job.get("state") in manifest.TERMINAL_STATES and stamp is not None
            and datetime.fromisoformat(stamp) < cutoff)
