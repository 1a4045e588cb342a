"""Celery tasks. Glue only: the work is in `jobs/`.

A job is finalized by whichever shard finishes last (it sees every shard accounted for in
the store), not by a chord callback: a chord waits on each header task's own result, so a
shard re-queued after its worker died (see workers/leases.py) would never count and the job
would hang until the broker's visibility timeout redelivered the original message. The
shard that finalizes a job from the inbox also delivers it to the outbox (jobs/inbox.py).

Tasks run in the threads of a Celery threads pool (BATCHINFER_WORKER_SHARDS of them,
workers/launcher.py), each shard with a stream of its own into the process's one engine
(workers/engine_cache.py). What a task keeps is its own: task.request is thread-local in
Celery, and the progress reporter, the lease (with its renewal thread) and the runner's
state are made per task.

Logs never carry secrets: failure reasons and tracebacks go through mask_secrets.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import TypeVar

from celery import Task
from celery.exceptions import Reject

from jobs import finalize, inbox, manifest, models, runner
from jobs.faults import is_transient
from jobs.settings import env_number, mask_secrets
from jobs.spec import load_spec
from jobs.store import Store, open_store
from workers.app import DEFAULT_QUEUE, app
from workers.engine_cache import engine_client
from workers.leases import ShardLeases, supports_leases

log = logging.getLogger(__name__)

# Flower shows a running task's progress only through a custom event's `result` field.
PROGRESS_EVENT_SECONDS = 2.0
# A store outage shorter than this is waited out (botocore also retries each request).
DEFAULT_STORE_RETRY_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 30.0
T = TypeVar("T")


def _progress_reporter(task: Task, job_id: str, shard_index: int, shards_total: int):
    last_sent = 0.0

    def report(done: int, total: int, tokens_per_second: float, occupancy: float) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if now - last_sent < PROGRESS_EVENT_SECONDS and done < total:
            return
        last_sent = now
        text = (f"job {job_id[:8]} shard {shard_index + 1}/{shards_total}: {done}/{total} rows, "
                f"{tokens_per_second:.0f} tok/s, occupancy {occupancy:.0%}")
        try:
            task.send_event("task-progress", result=text)
        except Exception as exc:  # progress must never fail a shard
            log.debug("progress event not sent: %s", exc)

    return report


def _lease(task: Task, job_id: str, shard_index: int, shards_total: int, store_url: str,
           attempt: int):
    broker = app.conf.broker_url
    if not supports_leases(broker):
        return nullcontext()
    queue = (task.request.delivery_info or {}).get("routing_key") or DEFAULT_QUEUE
    return ShardLeases(broker).held({
        "job_id": job_id, "shard_index": shard_index, "shards_total": shards_total,
        "store_url": store_url, "queue": queue, "worker": task.request.hostname or "",
        "attempt": attempt,
    })


def store_retry_seconds() -> float:
    """How long a shard keeps trying while the store (or broker) is unreachable."""
    return env_number("BATCHINFER_STORE_RETRY_SECONDS", DEFAULT_STORE_RETRY_SECONDS)


def _patiently(what: str, action: Callable[[], T]) -> T:
    """action(), tried again with exponential backoff while it fails for a transient reason
    (the store or the broker unreachable), for up to store_retry_seconds()."""
    deadline = time.monotonic() + store_retry_seconds()
    delay = 1.0
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; trying again in %.0fs", what,
                        mask_secrets(f"{type(exc).__name__}: {exc}"), delay)
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


@app.task(name="batchinfer.run_shard", bind=True)
def run_shard(self: Task, job_id: str, shard_index: int, shards_total: int, store_url: str,
              attempt: int = 0) -> dict:
    """Run one shard of a job (attempt N >= 1: retry round N of its failed rows), then
    finalize the job if it was the last one.

    A shard-level failure (the model cannot load, access denied) is recorded in the store,
    not raised, so that the job still ends, as failed, with the reason. A transient one
    (the store unreachable) is tried again, with backoff, for BATCHINFER_STORE_RETRY_SECONDS,
    then the shard goes back on the queue.
    """
    store = open_store(store_url)
    where = f"shard {shard_index} of job {job_id}"
    if attempt:
        where += f" (retry round {attempt})"
    try:
        job = None  # the manifest as the shard found it, once it has read it
        if _patiently(where, lambda: manifest.cancel_requested(store, job_id)):
            summary = runner.ShardSummary(shard_index, attempt, cancelled=True)
        else:
            with _lease(self, job_id, shard_index, shards_total, store_url, attempt):
                summary, job = _run(self, store, job_id, shard_index, shards_total, attempt,
                                    where)
        ended = _patiently(where, lambda: _finalize_if_last(store, job_id, summary, job))
        if ended is not None:
            _deliver_to_outbox(store, ended, where)
    except Exception as exc:
        reason = mask_secrets(f"{type(exc).__name__}: {exc}")
        if is_transient(exc):  # the store stayed unreachable: let a later run try
            log.error("%s could not reach the store; it goes back on the queue: %s", where,
                      reason)
            raise Reject(reason, requeue=True) from None
        # The store refuses even to record the failure (its bucket is gone, say).
        log.error("%s: its outcome could not be recorded in the store: %s\n%s", where,
                  reason, mask_secrets(traceback.format_exc()))
        return runner.ShardSummary(shard_index, attempt, error=reason).to_dict()
    return summary.to_dict()


def _finalize_if_last(store: Store, job_id: str, summary: runner.ShardSummary,
                      job: dict | None) -> dict | None:
    """Finalize the job if this shard was the last one out; the manifest if it did."""
    if summary.cancelled:  # nothing written, nothing to count: the cancel ends the job
        return finalize.finalize_if_complete(store, job_id)
    return finalize.finalize_after_shard(store, job_id, summary.shard, summary.attempt, job)


def _deliver_to_outbox(store: Store, job: dict, where: str) -> None:
    """A job from the inbox reaches outbox/NAME/ as it ends, not at the next inbox scan."""
    try:
        inbox.deliver_finished_job(store, job)
    except Exception as exc:  # the next inbox scan delivers it: no reason to fail the shard
        log.warning("%s: job %s not delivered to the outbox yet (the next inbox scan will): %s",
                    where, job["job_id"], mask_secrets(f"{type(exc).__name__}: {exc}"))


def _run(task: Task, store: Store, job_id: str, shard_index: int, shards_total: int,
         attempt: int, where: str) -> tuple[runner.ShardSummary, dict | None]:
    """The shard's summary, and the manifest as it was when the shard started (None if
    the shard failed before reading it)."""
    def run() -> tuple[runner.ShardSummary, dict]:
        spec = load_spec(store, job_id)
        with engine_client(models.resolve_model(spec.model)) as llm:
            job = manifest.mark_running(store, job_id)
            # The cancel was asked just before; the runner asks again as rows run.
            return runner.run_shard(
                store, job_id, shard_index, llm, attempt=attempt, spec=spec,
                worker=task.request.hostname or "",
                on_progress=_progress_reporter(task, job_id, shard_index, shards_total),
                should_cancel=lambda: manifest.cancel_requested(store, job_id),
            ), job

    try:
        return _patiently(where, run)
    except Exception as exc:
        if is_transient(exc):
            raise  # run_shard gives it back to the queue
        reason = mask_secrets(f"{type(exc).__name__}: {exc}")
        log.error("%s failed: %s\n%s", where, reason, mask_secrets(traceback.format_exc()))
        _patiently(where, lambda: finalize.record_shard_failure(
            store, job_id, shard_index, reason, attempt))
        return runner.ShardSummary(shard_index, attempt, error=reason), None
