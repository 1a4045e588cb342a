"""A job's manifest: its state, counts, usage totals and timings, in jobs/<id>/manifest.json.

States: validating -> queued -> running -> finalizing -> completed | failed | cancelled,
plus cancelling (asked to stop; shards stop at their next engine step). A finished job
can go back to queued (retry). Any other change of state is refused.

A cancel is also a marker object, jobs/<id>/cancel.json, which is what shards check: a
manifest write racing the cancel (a shard marking the job running) could otherwise lose it.

Writes are read-modify-write without a lock, so the last writer wins; only the
submitter, the first shard to start (queued -> running), a cancel request, the finalizer
and a retry (back to queued, or failed if it cannot queue) write it, and each writes the
fields it owns. The manifest never holds
secrets: no URLs, no credentials, no environment.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from jobs import keys
from jobs.errors import UserError
from jobs.store import NotFound, Store, get_json, put_json


class JobState(StrEnum):
    """A job's state; the manifest stores its value."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


STATES = tuple(JobState)
TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
# Asked to stop, or stopped.
CANCEL_STATES = frozenset({JobState.CANCELLING, JobState.CANCELLED})
_NEXT_STATES = {
    JobState.VALIDATING: {JobState.QUEUED, JobState.FAILED, JobState.CANCELLED},
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLING, JobState.FINALIZING,
                      JobState.FAILED},
    JobState.RUNNING: {JobState.FINALIZING, JobState.CANCELLING, JobState.FAILED},
    JobState.CANCELLING: {JobState.FINALIZING, JobState.CANCELLED, JobState.FAILED},
    JobState.FINALIZING: {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED},
    JobState.COMPLETED: {JobState.QUEUED},
    JobState.FAILED: {JobState.QUEUED},
    JobState.CANCELLED: {JobState.QUEUED},
}
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "busy_seconds", "cost_usd",
                "cost_per_million_tokens", "tokens_per_second", "occupancy",
                "mean_tokens_per_step")


def utc_now() -> str:
    """Now as ISO 8601 in UTC, the format of every manifest timestamp."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_manifest(job_id: str, model: str, total_rows: int, shards_total: int,
                 state: JobState = JobState.QUEUED) -> dict[str, Any]:
    return {
        "job_id": keys.validate_job_id(job_id),
        "state": state,
        "model": model,
        "counts": {"total_rows": total_rows, "succeeded_rows": 0, "failed_rows": 0,
                   "shards_total": shards_total, "shards_done": 0},
        "usage": {name: 0 for name in USAGE_FIELDS},
        "created_at": utc_now(),
        "started_at": None,
        "finished_at": None,
        "reason": None,  # why, when the job failed
    }


def load_manifest(store: Store, job_id: str) -> dict[str, Any]:
    try:
        return get_json(store, keys.manifest_key(job_id))
    except NotFound:
        raise UserError(f"job {job_id} not found in {store.url}") from None


def save_manifest(store: Store, job_id: str, manifest: dict[str, Any]) -> None:
    if manifest.get("state") not in STATES:
        raise ValueError(f"unknown job state {manifest.get('state')!r}")
    if manifest.get("job_id") != job_id:
        raise ValueError(f"manifest of job {manifest.get('job_id')!r} saved as job {job_id!r}")
    put_json(store, keys.manifest_key(job_id), manifest)


def update_manifest(store: Store, job_id: str, **changes: Any) -> dict[str, Any]:
    """Apply changes (dict values such as counts or usage are merged) and save.

    UserError if the change of state is not one the state machine allows.
    """
    manifest = load_manifest(store, job_id)
    new_state = changes.get("state", manifest["state"])
    if new_state != manifest["state"] and new_state not in _NEXT_STATES[manifest["state"]]:
        raise UserError(f"job {job_id} is {manifest['state']}; it cannot become {new_state}")
    for name, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(name), dict):
            manifest[name] = {**manifest[name], **value}
        else:
            manifest[name] = value
    save_manifest(store, job_id, manifest)
    return manifest


def mark_running(store: Store, job_id: str) -> dict[str, Any]:
    """queued -> running, stamping started_at (first run only); other states are left alone."""
    manifest = load_manifest(store, job_id)
    if manifest["state"] != JobState.QUEUED or store.exists(keys.cancel_key(job_id)):
        return manifest
    return update_manifest(store, job_id, state=JobState.RUNNING,
                           started_at=manifest.get("started_at") or utc_now())


def request_cancel(store: Store, job_id: str, by: str = "") -> dict[str, Any]:
    """Ask a job to stop (state cancelling); a job already ending is left alone. by: who
    asked, for the job's reason ("root@host with batchinfer cancel")."""
    manifest = load_manifest(store, job_id)
    if manifest["state"] not in (JobState.VALIDATING, JobState.QUEUED, JobState.RUNNING):
        return manifest
    marker = {"at": utc_now(), "by": by}
    put_json(store, keys.cancel_key(job_id), marker)
    return update_manifest(store, job_id, state=JobState.CANCELLING,
                           reason=_cancel_reason(marker))


def cancel_reason(store: Store, job_id: str) -> str:
    """The reason a cancelled job gives: who cancelled it and when."""
    try:
        return _cancel_reason(get_json(store, keys.cancel_key(job_id)))
    except NotFound:
        return "cancelled"


def _cancel_reason(marker: dict[str, Any]) -> str:
    by = f" by {marker['by']}" if marker.get("by") else ""
    return f"cancelled{by} at {marker.get('at', 'an unknown time')}"


def cancel_requested(store: Store, job_id: str) -> bool:
    """True once a cancel was asked for (and until a retry clears it): one HEAD request."""
    return store.exists(keys.cancel_key(job_id))


def clear_cancel(store: Store, job_id: str) -> None:
    """A retry runs the job again: its old cancel must not stop the new run."""
    store.delete(keys.cancel_key(job_id))


def list_manifests(store: Store) -> list[dict[str, Any]]:
    """Every job's manifest, newest first (jobs still being created have none yet)."""
    manifests = []
    for name in store.list_dirs(keys.JOBS_PREFIX):
        try:
            manifests.append(get_json(store, keys.manifest_key(name)))
        except (NotFound, UserError):  # a half-created job, or a folder that is not a job
            continue
    return sorted(manifests, key=lambda m: m.get("created_at") or "", reverse=True)
