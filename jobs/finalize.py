"""Finalize a job: count what its shards left in the store and write the final manifest.

A shard is accounted for once its results part exists (it ran, whatever became of its
rows) or it has recorded a failure (it could not run at all). The task that finds every
shard accounted for finalizes the job: whichever lists last after writing its own part
sees all of them, so some task always does, and two that both do write the same manifest.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from jobs import keys
from jobs.manifest import TERMINAL_STATES, load_manifest, update_manifest, utc_now
from jobs.settings import mask_secrets
from jobs.store import NotFound, Store, get_json, put_json
from jobs.tables import count_rows
from jobs.usage import read_job_usage, usage_totals


def record_shard_failure(store: Store, job_id: str, shard_index: int, reason: str) -> None:
    """Note that a shard could not run at all (its rows were not tried); fails the job.

    A later successful run of the shard (a retry) outweighs the note.
    """
    put_json(store, keys.failure_key(job_id, shard_index),
             {"shard": shard_index, "reason": mask_secrets(reason), "at": utc_now()})


def _done_shards(store: Store, job_id: str) -> set[int]:
    return {keys.shard_of_key(key) for key in store.list(keys.results_prefix(job_id))}


def _failures(store: Store, job_id: str, done: set[int]) -> dict[int, str]:
    """Recorded failure reasons of the shards that have no results."""
    reasons = {}
    for key in store.list(keys.failures_prefix(job_id)):
        shard = keys.shard_of_key(key)
        if shard not in done:
            try:
                reasons[shard] = get_json(store, key)["reason"]
            except NotFound:  # deleted since the listing
                continue
    return reasons


def finalize_if_complete(store: Store, job_id: str) -> dict[str, Any] | None:
    """Finalize the job if every shard is accounted for, or if it is being cancelled (each
    shard that stops then refreshes the counts); returns the manifest if it finalized."""
    manifest = load_manifest(store, job_id)
    if manifest["state"] not in ("cancelling", "cancelled"):
        done = _done_shards(store, job_id)
        accounted = done | set(_failures(store, job_id, done))
        if len(accounted) < manifest["counts"]["shards_total"]:
            return None
    return finalize_job(store, job_id)


def _final_state(cancelled: bool, shards_total: int, missing_shards: list[int],
                 shard_errors: list[str]) -> tuple[str, str | None]:
    if cancelled:
        return "cancelled", None
    if shard_errors:
        return "failed", f"{len(shard_errors)} shard(s) failed; first: {shard_errors[0]}"
    if missing_shards:
        shown = ", ".join(str(i) for i in missing_shards[:5])
        more = ", ..." if len(missing_shards) > 5 else ""
        return "failed", (f"{len(missing_shards)} of {shards_total} shards produced no results "
                          f"(shards {shown}{more})")
    return "completed", None


def finalize_job(store: Store, job_id: str) -> dict[str, Any]:
    """Write counts, usage totals, finished_at and the final state; returns the manifest.

    The job fails if a shard recorded a failure (record_shard_failure) or left no
    results; rows that failed are counted, not fatal. A cancel request makes it
    cancelled. A job already in a final state keeps it (a repeated finalize only
    refreshes the numbers).
    """
    manifest = load_manifest(store, job_id)
    cancelled = manifest["state"] in ("cancelling", "cancelled")
    if manifest["state"] not in TERMINAL_STATES:
        manifest = update_manifest(store, job_id, state="finalizing")

    done = _done_shards(store, job_id)
    failures = _failures(store, job_id, done)
    errors = [failures[shard] for shard in sorted(failures)]
    # An errors part without its results part is from an attempt that did not finish.
    error_keys = [key for key in store.list(keys.errors_prefix(job_id))
                  if keys.shard_of_key(key) in done]
    shards_total = manifest["counts"]["shards_total"]
    missing = [i for i in range(shards_total) if i not in done]

    created = date.fromisoformat(manifest["created_at"][:10])
    today = datetime.now(timezone.utc).date()
    records = [r for r in read_job_usage(store, job_id, created, today) if r.shard in done]

    changes: dict[str, Any] = {
        "counts": {
            "succeeded_rows": sum(count_rows(store, keys.result_key(job_id, i)) for i in done),
            "failed_rows": sum(count_rows(store, key) for key in error_keys),
            "shards_done": len(done),
        },
        "usage": usage_totals(records),
    }
    if manifest["state"] not in TERMINAL_STATES:
        state, reason = _final_state(cancelled, shards_total, missing, errors)
        changes.update(state=state, reason=mask_secrets(reason) if reason else None,
                       finished_at=utc_now())
    if not manifest.get("started_at") and records:
        changes["started_at"] = min(r.started_at for r in records).isoformat(
            timespec="milliseconds")
    return update_manifest(store, job_id, **changes)
