"""Celery tasks. Glue only: the work is in `jobs/`.

A job is finalized by whichever shard finishes last (it sees every shard accounted for in
the store), not by a chord callback: a chord waits on each header task's own result, so a
shard re-queued after its worker died (see workers/leases.py) would never count and the job
would hang until the broker's visibility timeout redelivered the original message.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

from celery import Task

from jobs import finalize, manifest, models, runner
from jobs.settings import mask_secrets
from jobs.spec import load_spec
from jobs.store import open_store
from workers.app import DEFAULT_QUEUE, app
from workers.engine_cache import get_engine
from workers.leases import ShardLeases, supports_leases

log = logging.getLogger(__name__)

# Flower shows a running task's progress only through a custom event's `result` field.
PROGRESS_EVENT_SECONDS = 2.0


def _progress_reporter(task: Task, job_id: str, shard_index: int, shards_total: int):
    last_sent = 0.0

    def report(done: int, total: int, tokens_per_second: float, batch_fill: float) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if now - last_sent < PROGRESS_EVENT_SECONDS and done < total:
            return
        last_sent = now
        text = (f"job {job_id[:8]} shard {shard_index + 1}/{shards_total}: {done}/{total} rows, "
                f"{tokens_per_second:.0f} tok/s, fill {batch_fill:.2f}")
        try:
            task.send_event("task-progress", result=text)
        except Exception as exc:  # progress must never fail a shard
            log.debug("progress event not sent: %s", exc)

    return report


def _lease(task: Task, job_id: str, shard_index: int, shards_total: int, store_url: str):
    broker = app.conf.broker_url
    if not supports_leases(broker):
        return nullcontext()
    queue = (task.request.delivery_info or {}).get("routing_key") or DEFAULT_QUEUE
    return ShardLeases(broker).held({
        "job_id": job_id, "shard_index": shard_index, "shards_total": shards_total,
        "store_url": store_url, "queue": queue, "worker": task.request.hostname or "",
    })


@app.task(name="batchinfer.run_shard", bind=True)
def run_shard(self: Task, job_id: str, shard_index: int, shards_total: int, store_url: str) -> dict:
    """Run one shard of a job, then finalize the job if it was the last one.

    A shard-level failure (the model cannot load, say) is recorded in the store, not
    raised, so that the job still ends, as failed, with the reason.
    """
    store = open_store(store_url)
    if manifest.cancel_requested(store, job_id):
        summary = {"shard": shard_index, "cancelled": True}
    else:
        with _lease(self, job_id, shard_index, shards_total, store_url):
            summary = _run(self, store, job_id, shard_index, shards_total)
    finalize.finalize_if_complete(store, job_id)
    return summary


def _run(task: Task, store, job_id: str, shard_index: int, shards_total: int) -> dict:
    try:
        spec = load_spec(store, job_id)
        llm = get_engine(models.resolve_model(spec.model))
        manifest.mark_running(store, job_id)
        return runner.run_shard(
            store, job_id, shard_index, llm,
            worker=task.request.hostname or "",
            on_progress=_progress_reporter(task, job_id, shard_index, shards_total),
            should_cancel=lambda: manifest.cancel_requested(store, job_id),
        )
    except Exception as exc:
        reason = mask_secrets(f"{type(exc).__name__}: {exc}")
        log.exception("shard %s of job %s failed", shard_index, job_id)
        finalize.record_shard_failure(store, job_id, shard_index, reason)
        return {"shard": shard_index, "error": reason}
