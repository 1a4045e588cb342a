"""Finalize a job: count what its shards left in the store and write the final manifest.

A shard is accounted for once its results part exists (it ran, whatever became of its
rows) or it has recorded a failure (it could not run at all); during a retry round that
reruns some of its rows, once that round's part or failure exists (jobs/retry.py). The
task that finds every shard accounted for finalizes the job: whichever lists last after
writing its own part sees all of them, so some task always does, and two that both do
write the same manifest. Counts follow jobs/outcomes.py (retried rows count once).

Listing every part after every shard would make a shard's cost grow with the job, so a
shard's task asks finalize_after_shard instead: it adds the shard to one small object,
jobs/<id>/shards-done.json (a bitmap of the shards of the first run that are accounted
for, updated with the store's conditional read-modify-write), a constant few requests.
Only the shard whose update completes the bitmap (or one that finds it complete: a
redelivered duplicate) lists the parts and finalizes. A shard adds itself only after its
results part or failure is in the store, so the bitmap never counts a shard that is not
accounted for; a shard that died between the two is delivered again, finds its part and
adds itself then. A retry round (few shards, and its accounting differs per shard) and a
cancel go the listing way, as does finalize_if_complete, which asks the store alone.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from typing import Any

from jobs import keys
from jobs.errors import UserError
from jobs.manifest import (
    CANCEL_STATES,
    TERMINAL_STATES,
    JobState,
    cancel_reason,
    cancel_requested,
    load_manifest,
    update_manifest,
    utc_now,
)
from jobs.outcomes import ShardOutcome, count_failed, count_succeeded, list_outcomes
from jobs.settings import mask_secrets
from jobs.store import NotFound, Store, get_json, put_json
from jobs.usage import job_usage_parts, usage_totals


def record_shard_failure(store: Store, job_id: str, shard_index: int, reason: str,
                         attempt: int = 0) -> None:
    """Note that a shard (or retry round `attempt` of its rows) could not run at all; fails
    the job. A later successful run of the shard (a retry) outweighs the note.
    """
    put_json(store, keys.failure_key(job_id, shard_index, attempt),
             {"shard": shard_index, "attempt": attempt, "reason": mask_secrets(reason),
              "at": utc_now()})


def _failure_keys(store: Store, job_id: str) -> dict[tuple[int, int], str]:
    return {keys.part_of_key(key): key for key in store.list(keys.failures_prefix(job_id))}


def _reason(store: Store, key: str) -> str | None:
    try:
        return get_json(store, key)["reason"]
    except NotFound:  # deleted since the listing (a retry starting)
        return None


def retry_round(manifest: dict[str, Any]) -> tuple[int, set[int]]:
    """The job's current retry round and the shards whose rows it runs again (0, {} if none).

    Shards that a round runs whole (they had no results) are not in the set: they are
    accounted for like a first run."""
    current = manifest.get("retry") or {}
    return int(current.get("round", 0)), set(current.get("row_shards", []))


def _accounted(outcomes: dict[int, ShardOutcome], failures: dict[tuple[int, int], str],
               shard: int, round_number: int, row_shards: set[int]) -> bool:
    outcome = outcomes.get(shard)
    if shard in row_shards:
        return ((outcome is not None and round_number in outcome.results)
                or (shard, round_number) in failures)
    return (outcome is not None and outcome.done) or (shard, 0) in failures


def _cancelled(store: Store, job_id: str, manifest: dict[str, Any]) -> bool:
    return manifest["state"] in CANCEL_STATES or (
        manifest["state"] not in TERMINAL_STATES and cancel_requested(store, job_id))


def _all_accounted(store: Store, job_id: str, manifest: dict[str, Any]) -> bool:
    """Every shard has a results part or a recorded failure (for the current retry round
    where one runs its rows): from a listing of every part."""
    outcomes = list_outcomes(store, job_id)
    failures = _failure_keys(store, job_id)
    round_number, row_shards = retry_round(manifest)
    return all(_accounted(outcomes, failures, shard, round_number, row_shards)
               for shard in range(manifest["counts"]["shards_total"]))


def finalize_if_complete(store: Store, job_id: str) -> dict[str, Any] | None:
    """Finalize the job if every shard is accounted for (it has a results part or a recorded
    failure, for the current retry round where one runs its rows), or at once if it is being
    cancelled (each shard that stops then refreshes the counts); returns the manifest if it
    finalized."""
    manifest = load_manifest(store, job_id)
    if _cancelled(store, job_id, manifest) or _all_accounted(store, job_id, manifest):
        return finalize_job(store, job_id)
    return None


def finalize_after_shard(store: Store, job_id: str, shard_index: int, attempt: int = 0,
                         manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """finalize_if_complete for the task of a shard whose outcome is in the store (its
    results part of attempt `attempt`, or its recorded failure), in a constant number of
    requests unless the job may be complete (module docstring); returns the manifest if
    it finalized.

    manifest: the job's manifest as the task read it when it started, if it did (it saves
    a read: the cancel marker is asked anyway, and a retry round that began since runs
    tasks of its own, which finalize it).
    """
    if manifest is None:
        manifest = load_manifest(store, job_id)
    if _cancelled(store, job_id, manifest):
        return finalize_job(store, job_id)
    if attempt == 0 and retry_round(manifest)[0] == 0:
        shards_total = manifest["counts"]["shards_total"]
        if not _mark_shard_done(store, job_id, shard_index, shards_total):
            return None
        manifest = load_manifest(store, job_id)  # the one that finalizes reads it afresh
    if _all_accounted(store, job_id, manifest):
        return finalize_job(store, job_id)
    return None


def _mark_shard_done(store: Store, job_id: str, shard_index: int, shards_total: int) -> bool:
    """Add the shard to the job's shards-done bitmap; True if it now holds every shard."""
    def add(current: bytes | None) -> bytes:
        done = _decode_done(current, shards_total) | 1 << shard_index
        encoded = base64.b64encode(done.to_bytes((shards_total + 7) // 8, "little"))
        return json.dumps({"shards_total": shards_total, "done": encoded.decode()}).encode()

    written = store.update(keys.shards_done_key(job_id), add)
    return _decode_done(written, shards_total).bit_count() == shards_total


def _decode_done(data: bytes | None, shards_total: int) -> int:
    """The shards-done bitmap as an int (bit i: shard i), 0 if there is none yet."""
    if data is None:
        return 0
    bits = int.from_bytes(base64.b64decode(json.loads(data)["done"]), "little")
    return bits & ((1 << shards_total) - 1)


def _final_state(cancelled: str | None, shards_total: int, missing_shards: list[int],
                 shard_errors: list[str]) -> tuple[JobState, str | None]:
    """cancelled: the cancel's reason, if the job was cancelled."""
    if cancelled:
        return JobState.CANCELLED, cancelled
    if shard_errors:
        return JobState.FAILED, f"{len(shard_errors)} shard(s) failed; first: {shard_errors[0]}"
    if missing_shards:
        shown = ", ".join(str(i) for i in missing_shards[:5])
        more = ", ..." if len(missing_shards) > 5 else ""
        return JobState.FAILED, (f"{len(missing_shards)} of {shards_total} shards produced no results "
                          f"(shards {shown}{more})")
    return JobState.COMPLETED, None


# A finalizer counts again while parts keep appearing under it, at most this often.
MAX_RECOUNTS = 5


def _signature(store: Store, job_id: str) -> tuple:
    """Every part and failure key: what a finalize counted, to notice a part written meanwhile."""
    return (tuple(store.list(keys.results_prefix(job_id))),
            tuple(store.list(keys.errors_prefix(job_id))),
            tuple(store.list(keys.failures_prefix(job_id))))


def finalize_job(store: Store, job_id: str) -> dict[str, Any]:
    """Write counts, usage totals, finished_at and the final state; returns the manifest.

    The job fails if a shard recorded a failure (record_shard_failure), left no results,
    or could not run the current retry round; rows that failed are counted, not fatal. A
    cancel request makes it cancelled. A job already in a final state keeps it (a repeated
    finalize only refreshes the numbers).

    Two finalizers may race (the last two shards, a shard finishing just after a cancel):
    each counts again after writing until what it counted is still all there is, so the
    manifest written last always counts every part written before it.
    """
    manifest = load_manifest(store, job_id)
    cancelled = _cancelled(store, job_id, manifest)
    if manifest["state"] not in TERMINAL_STATES:
        try:
            manifest = update_manifest(store, job_id, state=JobState.FINALIZING)
        except UserError:
            # Another finalizer (a shard stopping beside this one, in this worker or
            # another) ended the job since it was read: count again, in its final state.
            manifest = load_manifest(store, job_id)
            if manifest["state"] not in TERMINAL_STATES:
                raise
    for _ in range(MAX_RECOUNTS):
        before = _signature(store, job_id)
        changes = _final_changes(store, job_id, manifest, cancelled)
        manifest = update_manifest(store, job_id, **changes)
        if _signature(store, job_id) == before:
            break
    return manifest



def _final_changes(store: Store, job_id: str, manifest: dict[str, Any],
                   cancelled: bool) -> dict[str, Any]:
    outcomes = list_outcomes(store, job_id)
    failures = _failure_keys(store, job_id)
    round_number, row_shards = retry_round(manifest)
    shards_total = manifest["counts"]["shards_total"]
    done = sorted(shard for shard, outcome in outcomes.items() if outcome.done)

    errors = []
    for (shard, attempt), key in sorted(failures.items()):
        if attempt == 0 and shard not in done:
            reason = _reason(store, key)
        elif (attempt and attempt == round_number and shard in row_shards
              and attempt not in outcomes[shard].results):
            reason = _reason(store, key)
            reason = reason and f"retry round {attempt} of shard {shard}: {reason}"
        else:
            continue
        if reason is not None:
            errors.append(reason)
    missing = [i for i in range(shards_total)
               if i not in outcomes or not outcomes[i].done]

    created = date.fromisoformat(manifest["created_at"][:10])
    today = datetime.now(UTC).date()
    counted = {(shard, attempt) for shard in done for attempt in outcomes[shard].results}
    usage = job_usage_parts(store, job_id, created, today)
    records = [usage[part] for part in sorted(usage) if part in counted]

    changes: dict[str, Any] = {
        "counts": {
            "succeeded_rows": sum(count_succeeded(store, outcomes[shard]) for shard in done),
            "failed_rows": sum(count_failed(store, outcomes[shard]) for shard in done),
            "shards_done": len(done),
        },
        "usage": usage_totals(records),
    }
    if manifest["state"] not in TERMINAL_STATES:
        state, reason = _final_state(cancel_reason(store, job_id) if cancelled else None,
                                     shards_total, missing, errors)
        changes.update(state=state, reason=mask_secrets(reason) if reason else None,
                       finished_at=utc_now())
    if not manifest.get("started_at") and records:
        changes["started_at"] = min(r.started_at for r in records).isoformat(
            timespec="milliseconds")
    return changes
