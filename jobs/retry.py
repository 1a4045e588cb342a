"""`batchinfer retry JOB` / `Job.retry()`: run again what did not succeed, nothing else.

A retry round N of a finished job (completed, failed or cancelled) runs:
- whole, every shard that has no results: it failed at shard level (its model could not
  load, the store refused a write...) or never ran (the job was cancelled). Its recorded
  failure is cleared first; it writes the usual results/part-NNNNN.parquet;
- row by row, for every finished shard, the rows whose latest error is of kind
  "transient" (the engine failed on them at run time, e.g. out of memory even alone),
  into results/part-NNNNN-rNNN.parquet and errors/part-NNNNN-rNNN.parquet.
Rows that succeeded are never touched, and invalid rows (no prompt, too long, a bad
override) are not run again: they would fail the same way. Counts and merged results
take every part into account (jobs/outcomes.py), so no row is lost or counted twice.

The round's plan is a claim (`retries/round-rNNN.json`, jobs/claims.py): of two racing
retries of the same job, one starts the round and the other is told so. The manifest
goes back to `queued` with `retry: {round, row_shards}`, and the job finalizes when every
shard of the round is accounted for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs import keys
from jobs.claims import claim
from jobs.errors import UserError
from jobs.finalize import retry_round
from jobs.manifest import (
    TERMINAL_STATES,
    JobState,
    clear_cancel,
    load_manifest,
    update_manifest,
    utc_now,
)
from jobs.outcomes import list_outcomes, transient_ids
from jobs.settings import mask_secrets
from jobs.store import Store

# A round claimed this long ago whose manifest never said so was started by a retry that
# died before queueing anything: a new retry takes the round over.
STALE_ROUND_SECONDS = 300

# enqueue(shard_index, attempt): put one shard task on the queue (attempt 0: the whole shard).
Enqueue = Callable[[int, int], None]


@dataclass
class RetryPlan:
    job_id: str
    round: int
    whole_shards: list[int] = field(default_factory=list)
    row_shards: dict[int, int] = field(default_factory=dict)  # shard -> rows to run again

    @property
    def rows(self) -> int:
        return sum(self.row_shards.values())

    @property
    def empty(self) -> bool:
        return not self.whole_shards and not self.row_shards

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "round": None if self.empty else self.round,
                "whole_shards": list(self.whole_shards),
                "row_shards": {str(k): v for k, v in sorted(self.row_shards.items())},
                "rows": self.rows}


def plan_retry(store: Store, job_id: str) -> RetryPlan:
    """What a retry of the job would run now (the job must have finished)."""
    manifest = load_manifest(store, job_id)
    round_number = retry_round(manifest)[0] + 1
    outcomes = list_outcomes(store, job_id)
    plan = RetryPlan(job_id, round_number)
    for shard in range(manifest["counts"]["shards_total"]):
        outcome = outcomes.get(shard)
        if outcome is None or not outcome.done:
            plan.whole_shards.append(shard)
            continue
        ids = transient_ids(store, outcome)
        if ids:
            plan.row_shards[shard] = len(ids)
    return plan


def start_retry(store: Store, job_id: str, enqueue: Enqueue) -> dict[str, Any]:
    """Start a retry round of a finished job; returns its summary (round None: nothing to
    retry). UserError if the job is still going or another retry started this round."""
    manifest = load_manifest(store, job_id)
    if manifest["state"] not in TERMINAL_STATES:
        raise UserError(f"job {job_id} is {manifest['state']}; retry it once it has finished")
    plan = plan_retry(store, job_id)
    if plan.empty:
        return plan.summary()
    _claim_round(store, plan)
    clear_cancel(store, job_id)
    for shard in plan.whole_shards:  # their old failure would account for them at once
        store.delete(keys.failure_key(job_id, shard))
    update_manifest(store, job_id, state=JobState.QUEUED, reason=None, finished_at=None,
                    retry={"round": plan.round, "row_shards": sorted(plan.row_shards)})
    try:
        for shard in plan.whole_shards:
            enqueue(shard, 0)
        for shard in sorted(plan.row_shards):
            enqueue(shard, plan.round)
    except Exception as error:
        reason = mask_secrets(f"retry round {plan.round} could not be queued: "
                              f"{type(error).__name__}: {error}")
        update_manifest(store, job_id, state=JobState.FAILED, reason=reason, finished_at=utc_now())
        raise
    return plan.summary()


def _claim_round(store: Store, plan: RetryPlan) -> None:
    key = keys.retry_round_key(plan.job_id, plan.round)
    if not claim(store, key, asdict(plan), STALE_ROUND_SECONDS, stamp="at").won:
        raise UserError(f"retry round {plan.round} of job {plan.job_id} has already been "
                        f"started")
