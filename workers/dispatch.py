"""Put a job's shards on the queue, one `run_shard` task each, sent by task name so that
the sender (the client, the CLI, the watchdog) needs no worker code loaded."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from celery import Celery

from jobs import settings
from workers.app import DEFAULT_QUEUE, create_app


def _app_for(broker_url: str | None) -> Celery:
    # Keyed by the broker and the embedded broker's folder as they are now, not as they were
    # when workers.app was first imported: a pipeline process may point elsewhere later.
    return _cached_app(broker_url or settings.broker_url(), settings.home())


@lru_cache(maxsize=4)
def _cached_app(broker_url: str, home: Path) -> Celery:
    return create_app(broker_url)


def send_shard(job_id: str, shard_index: int, shards_total: int, store_url: str, *,
               queue: str | None = None, broker_url: str | None = None) -> None:
    _app_for(broker_url).send_task(
        "batchinfer.run_shard", args=(job_id, shard_index, shards_total, store_url),
        queue=queue or DEFAULT_QUEUE)


def enqueue_job(job_id: str, shards_total: int, store_url: str, *,
                queue: str | None = None, broker_url: str | None = None) -> None:
    for index in range(shards_total):
        send_shard(job_id, index, shards_total, store_url, queue=queue, broker_url=broker_url)


def requeue_expired_shards(broker_url: str | None = None) -> int:
    """One watchdog pass: send again every shard whose lease expired; returns how many."""
    from workers.leases import ShardLeases, supports_leases

    app = _app_for(broker_url)
    if not supports_leases(app.conf.broker_url):
        return 0
    expired = ShardLeases(app.conf.broker_url).claim_expired()
    for task in expired:
        send_shard(task["job_id"], task["shard_index"], task["shards_total"], task["store_url"],
                   queue=task["queue"], broker_url=broker_url)
    return len(expired)
