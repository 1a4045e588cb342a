"""Celery tasks for the pipeline's scheduled work (jobs/inbox.py, jobs/rollup.py,
jobs/expiry.py) and the shard watchdog; beat (workers/beat.py) sends them to the nightly
queue. Each is safe to run twice or at the same time as itself."""

from __future__ import annotations

import os

from jobs import expiry, inbox, rollup, settings
from jobs.store import open_store
from workers.app import app
from workers.client import Client


@app.task(name="batchinfer.nightly.scan_inbox")
def scan_inbox() -> dict:
    """Submit new inbox files as jobs and deliver finished ones to the outbox."""
    client = Client()
    return inbox.scan_inbox(client.store, client.submit)


@app.task(name="batchinfer.nightly.rollup_usage")
def rollup_usage(day: str | None = None) -> dict:
    """Roll up one day's usage (YYYY-MM-DD; default yesterday, UTC)."""
    when = rollup.parse_day(day) if day else rollup.yesterday()
    return rollup.rollup_usage(open_store(settings.store_url()), when)


@app.task(name="batchinfer.nightly.expire_jobs")
def expire_jobs(retention_days: int | None = None) -> list[str]:
    """Delete finished jobs past the retention (default BATCHINFER_RETENTION_DAYS)."""
    days = (expiry.retention_days_from_env(os.environ) if retention_days is None
            else retention_days)
    return expiry.expire_jobs(open_store(settings.store_url()), days)


@app.task(name="batchinfer.ops.requeue_expired_shards")
def requeue_expired_shards() -> int:
    """One watchdog pass: send again the shards whose worker stopped renewing its lease."""
    from workers.watchdog import requeue_expired_shards as requeue

    return requeue()
