"""The shard watchdog as a Celery beat entry: `batchinfer beat` sends the watchdog pass to
the nightly queue every lease / 4, a worker there runs it, and a shard whose worker
stopped renewing its lease is sent again to its own queue (with its retry attempt)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from jobs import keys
from tests.reliability.helpers import unacknowledged_shards, wait_for
from tests.servers import log_tail
from workers.beat import NIGHTLY_QUEUE, beat_schedule
from workers.dispatch import send_shard
from workers.leases import LEASES_KEY, ShardLeases
from workers.watchdog import requeue_expired_shards


def test_the_watchdog_entry_follows_the_lease():
    entry = beat_schedule({"BATCHINFER_LEASE_SECONDS": "8"})["requeue-expired-shards"]
    assert entry["task"] == "batchinfer.ops.requeue_expired_shards"
    assert entry["schedule"] == 2.0
    assert entry["options"] == {"queue": NIGHTLY_QUEUE, "expires": 2.0}
    assert beat_schedule({})["requeue-expired-shards"]["schedule"] == 15.0


def test_beat_requeues_a_shard_whose_worker_went_silent(tmp_path, secure_stack):
    stack = secure_stack
    job_id, orphans = keys.new_job_id(), f"orphans-{uuid.uuid4().hex[:8]}"
    # What a worker that died mid-shard leaves: a lease nobody renews (here a short one).
    ShardLeases(stack.redis.url, seconds=0.1).acquire({
        "job_id": job_id, "shard_index": 7, "shards_total": 9, "store_url": "s3://b/p",
        "queue": orphans, "worker": "gone@host", "attempt": 2})
    time.sleep(0.2)
    broker = redis.Redis.from_url(stack.redis.url)
    env = stack.env | {"BATCHINFER_HOME": str(tmp_path / "home"),
                       "BATCHINFER_LEASE_SECONDS": "2"}
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        beat = subprocess.Popen([sys.executable, "-m", "workers.cli", "beat"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def beat_alive() -> None:
            if beat.poll() is not None:
                pytest.fail(f"beat exited:\n{log_tail(log)}")

        wait_for(lambda: broker.llen(orphans) >= 1, 60, "the shard sent again", check=beat_alive)
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)
    message = json.loads(broker.lindex(orphans, 0))
    assert message["headers"]["task"] == "batchinfer.run_shard"
    assert json.loads(base64.b64decode(message["body"]))[:2] == [
        [job_id, 7, 9, "s3://b/p"], {"attempt": 2}]
    lease = json.loads(broker.hget(LEASES_KEY, f"{job_id}:7"))
    assert lease["worker"] == "gone@host"  # re-armed: sent again once, not at every pass
    assert "batchinfer.ops.requeue_expired_shards" in stack.worker.log_path.read_text()
    broker.hdel(LEASES_KEY, f"{job_id}:7")



def test_a_delivery_stranded_by_a_lost_worker_goes_back(redis_server, monkeypatch):
    """A worker took a shard's message and lost Redis before it could start it or give it
    back (here: a process that takes it and exits at once): after a lease's time with no
    lease for that shard, a watchdog pass puts it back at the head of its queue."""
    monkeypatch.setenv("BATCHINFER_LEASE_SECONDS", "2")
    broker = redis.Redis.from_url(redis_server.url)
    queue, job_id = f"stranded-{uuid.uuid4().hex[:8]}", keys.new_job_id()
    send_shard(job_id, 3, 5, "s3://b/p", queue=queue, broker_url=redis_server.url)
    taker = ("import os, sys; from kombu import Connection; "
             "channel = Connection(sys.argv[1]).default_channel; "
             "assert channel.basic_get(sys.argv[2], no_ack=False) is not None; os._exit(0)")
    subprocess.run([sys.executable, "-c", taker, redis_server.url, queue], check=True,
                   timeout=60)
    assert broker.llen(queue) == 0
    assert [job_id, 3] in unacknowledged_shards(broker)

    assert requeue_expired_shards(redis_server.url) == 0  # a moment ago: maybe starting
    time.sleep(2.2)
    assert requeue_expired_shards(redis_server.url) == 1
    assert broker.llen(queue) == 1 and [job_id, 3] not in unacknowledged_shards(broker)
    message = json.loads(broker.lindex(queue, 0))
    assert json.loads(base64.b64decode(message["body"]))[0] == [job_id, 3, 5, "s3://b/p"]
    assert requeue_expired_shards(redis_server.url) == 0  # once
