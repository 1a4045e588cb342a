"""Put a job's shards on the queue, one `run_shard` task each, sent by task name so that
the sender (the client, the CLI, the watchdog) needs no worker code loaded."""

from __future__ import annotations

import base64
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from jobs import settings
from jobs.errors import ServiceUnavailable
from workers.app import DEFAULT_QUEUE, create_app

log = logging.getLogger(__name__)


def _app_for(broker_url: str | None) -> Celery:
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
    app = _app_for(broker_url)
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

    app = _app_for(broker_url)
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


def requeue_expired_shards(broker_url: str | None = None) -> int:
    """One watchdog pass; returns how many shards it gave back to the queue.

    - A shard whose lease expired (its worker died or lost the broker): its original
      delivery, which Redis holds as unacknowledged until the visibility timeout, is put
      back at the head of its queue (kombu's restore_by_tag), so it runs next; if there is
      none, the shard is sent again.
    - A delivery that no worker is running (no lease) for longer than a lease: a worker
      took it and lost its connection to Redis before it could start it or give it back
      (or before acknowledging it). It goes back to the head of its queue too. A shard
      that did finish is skipped when it runs again.
    """
    from workers.leases import ShardLeases, supports_leases

    app = _app_for(broker_url)
    if not supports_leases(app.conf.broker_url):
        return 0
    leases = ShardLeases(app.conf.broker_url)
    expired = leases.claim_expired()
    requeued = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        deliveries = _unacked_shard_deliveries(channel)
        for task in expired:
            shard = (task["job_id"], task["shard_index"])
            log.warning("shard %s of job %s (attempt %s) went silent on %s: queued again",
                        task["shard_index"], task["job_id"], task.get("attempt", 0),
                        task.get("worker") or "an unknown worker")
            tags = [tag for tag, _ in deliveries.pop(shard, [])]
            for tag in tags:
                channel.qos.restore_by_tag(tag)
            if not tags:
                send_shard(task["job_id"], task["shard_index"], task["shards_total"],
                           task["store_url"], queue=task["queue"], broker_url=broker_url,
                           attempt=task.get("attempt", 0))
            requeued += 1
        running = leases.fields()
        cutoff = time.time() - leases.seconds
        for (job_id, shard_index), items in deliveries.items():
            if f"{job_id}:{shard_index}" in running:
                continue
            stranded = [tag for tag, delivered_at in items if delivered_at < cutoff]
            for tag in stranded:
                log.warning("shard %s of job %s was delivered %.0fs ago and is not running: "
                            "queued again", shard_index, job_id,
                            time.time() - dict(items)[tag])
                channel.qos.restore_by_tag(tag)
            requeued += bool(stranded)
    return requeued


def _unacked_shard_deliveries(channel) -> dict[tuple[str, int], list[tuple[str, float]]]:
    """(job_id, shard) -> [(delivery tag, delivered at)] of the run_shard messages that the
    Redis transport holds as delivered but not acknowledged."""
    client = channel.client
    delivered_at = dict(client.zrange(channel.unacked_index_key, 0, -1, withscores=True))
    deliveries: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for tag, raw in client.hgetall(channel.unacked_key).items():
        try:
            message = json.loads(raw)[0]
            if message["headers"].get("task") != "batchinfer.run_shard":
                continue
            args = json.loads(base64.b64decode(message["body"]))[0]
            shard = (str(args[0]), int(args[1]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not one of ours, or not JSON: left to the visibility timeout
        tag_text = tag.decode() if isinstance(tag, bytes) else tag
        deliveries.setdefault(shard, []).append((tag_text, delivered_at.get(tag, 0.0)))
    return deliveries
