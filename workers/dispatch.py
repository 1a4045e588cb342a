"""Put a job's shards on the queue, one `run_shard` task each, sent by task name so that
the sender (the client, the CLI, the watchdog) needs no worker code loaded; and ask which
workers consume a queue."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from jobs import settings
from jobs.errors import ServiceUnavailable
from workers.app import DEFAULT_QUEUE, create_app


def app_for(broker_url: str | None) -> Celery:
    """The Celery app for a broker (default: the configured one), to send with."""
    # Keyed by the broker and the embedded broker's folder as they are now, not as they were
    # when workers.app was first imported: a pipeline process may point elsewhere later.
    return _cached_app(broker_url or settings.broker_url(), settings.home())


@lru_cache(maxsize=4)
def _cached_app(broker_url: str, home: Path) -> Celery:
    return create_app(broker_url)


def send_shard(job_id: str, shard_index: int, shards_total: int, store_url: str, *,
               queue: str | None = None, broker_url: str | None = None,
               attempt: int = 0) -> None:
    """One run_shard task; attempt N >= 1 runs retry round N of the shard's failed rows.

    ServiceUnavailable if the broker cannot be reached (after Celery's publish retries)."""
    app = app_for(broker_url)
    try:
        app.send_task(
            "batchinfer.run_shard", args=(job_id, shard_index, shards_total, store_url),
            kwargs={"attempt": attempt} if attempt else None, queue=queue or DEFAULT_QUEUE)
    except OperationalError as error:
        raise _unreachable(app, error) from None


def _unreachable(app: Celery, error: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(settings.mask_secrets(
        f"cannot reach the broker at {app.conf.broker_url} ({error}); check "
        f"BATCHINFER_BROKER_URL and that the broker is running"))


def queue_consumers(queue: str | None = None, broker_url: str | None = None,
                    timeout: float = 1.0) -> list[str]:
    """The workers (hostnames) that consume queue (default queue if None): those that
    answer within timeout, and those running a shard from it (a solo-pool worker answers
    only between shards). Empty means a job sent there waits until a worker for it starts.
    """
    from workers.leases import ShardLeases, supports_leases

    app = app_for(broker_url)
    wanted = queue or DEFAULT_QUEUE
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
        busy = (ShardLeases(app.conf.broker_url).live()
                if supports_leases(app.conf.broker_url) else [])
    except (OperationalError, redis.RedisError) as error:
        raise _unreachable(app, error) from None
    idle = {worker for worker, queues in replies.items()
            if any(q.get("name") == wanted for q in queues or ())}
    return sorted(idle | {lease.get("worker") or "a busy worker" for lease in busy
                          if lease.get("queue") == wanted})


def enqueue_job(job_id: str, shards_total: int, store_url: str, *,
                queue: str | None = None, broker_url: str | None = None) -> None:
    for index in range(shards_total):
        send_shard(job_id, index, shards_total, store_url, queue=queue, broker_url=broker_url)
