"""The watchdog: shards whose worker went silent go back to the queue.

A running shard holds a lease (workers/leases.py) that its worker renews every few
seconds; when a lease has not been renewed for BATCHINFER_LEASE_SECONDS, a watchdog pass
puts the shard back. It runs in every `batchinfer worker` launcher (a thread) and as a
beat entry (workers/beat.py) served by the nightly queue's worker; any number of them may
run, since claiming an expired lease is atomic. The stale message, if Redis ever
redelivers it, finds the shard's part file and does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import time

from workers.dispatch import app_for, send_shard
from workers.leases import ShardLeases, supports_leases

log = logging.getLogger(__name__)


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
    app = app_for(broker_url)
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
