"""redis-server restarted (same port) in the middle of a job: the queued shard messages,
the unacknowledged ones and the shard leases survive on its append-only file, workers
reconnect on their own, and the job completes with every row once."""

from __future__ import annotations

import time

import pytest

from tests.reliability.helpers import assert_exactly_once, prompts_table, wait_for, write_input
from tests.servers import RedisServer
from tests.worker_processes import running_workers, worker_env
from workers.client import Client


@pytest.fixture
def persistent_redis(tmp_path):
    """A redis-server of this test's own that writes every change to its AOF (the session
    one keeps nothing across a restart, like a cache would)."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_workers_reconnect_after_a_redis_restart(tmp_path, persistent_redis, s3_store_url,
                                                 tiny_llama, queue):
    rows, shard_size = 500, 50
    path = write_input(tmp_path, prompts_table(rows), row_group_size=shard_size)
    client = Client(store_url=s3_store_url, broker_url=persistent_redis.url)
    env = worker_env(persistent_redis.url, s3_store_url, BATCHINFER_LEASE_SECONDS="5",
                     BATCHINFER_MAX_NUM_SEQS="4")
    with running_workers(2, env, tmp_path, ["--queues", queue], launcher=True):
        job = client.submit(path, model=str(tiny_llama), max_tokens=4, shard_size=shard_size,
                            id_column="id", queue=queue)
        results = job.client.store
        wait_for(lambda: len(results.list(f"jobs/{job.id}/results/")) >= 3, 120,
                 "three shards done")
        down_at = time.monotonic()
        persistent_redis.stop()  # SIGTERM: redis-server flushes its AOF and exits
        time.sleep(2)  # workers notice, fail to reconnect, keep trying
        done_while_down = len(results.list(f"jobs/{job.id}/results/"))
        persistent_redis.start()  # same port, same data folder
        downtime = time.monotonic() - down_at
        status = job.wait(timeout=120)
        finished = time.monotonic() - down_at
    print(f"\nredis down {downtime:.1f}s with {done_while_down}/{rows // shard_size} shards "
          f"done; job completed {finished:.1f}s after the stop")
    assert status["state"] == "completed", status
    assert done_while_down < rows // shard_size, "the restart came too late to matter"
    assert_exactly_once(client, job.id, {f"r{i:05d}" for i in range(rows)})
