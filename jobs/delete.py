"""Deleting a finished job's objects: by hand (`batchinfer delete JOB`) or when it expires.

Usage records (usage/date=.../) stay: they are the accounting of work done, rolled up
nightly, whatever became of the job.
"""

from __future__ import annotations

import logging

from jobs import keys
from jobs.errors import UserError
from jobs.manifest import TERMINAL_STATES, load_manifest
from jobs.store import Store

log = logging.getLogger(__name__)


def delete_job(store: Store, job_id: str) -> None:
    """Delete every object of a finished job; UserError if it is still going (cancel it
    first) or unknown."""
    state = load_manifest(store, job_id)["state"]
    if state not in TERMINAL_STATES:
        raise UserError(f"job {job_id} is {state}; cancel it (batchinfer cancel {job_id}) "
                        f"and delete it once it has ended")
    delete_job_objects(store, job_id)


def delete_job_objects(store: Store, job_id: str) -> None:
    # The manifest goes last: a deletion cut short still shows the job, to be deleted again.
    manifest_key = keys.manifest_key(job_id)
    for key in store.list(keys.job_prefix(job_id)):
        if key != manifest_key:
            store.delete(key)
    store.delete(manifest_key)
    log.info("job %s deleted", job_id)
