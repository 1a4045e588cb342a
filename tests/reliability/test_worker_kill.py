"""A worker killed with SIGKILL in the middle of a shard: its lease stops being renewed, a
watchdog (in the surviving `batchinfer worker` launcher) puts the shard's delivery back at
the head of its queue after the lease, not after Redis's 12 h visibility timeout, and the
job ends with every row once."""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis

from jobs import keys
from jobs.tables import read_table
from tests.reliability.helpers import (
    assert_exactly_once,
    prompts_table,
    unacknowledged_shards,
    wait_for,
    write_input,
)
from tests.worker_processes import WorkerProcess, worker_env
from workers.app import VISIBILITY_TIMEOUT_SECONDS
from workers.client import Client
from workers.leases import LEASES_KEY

LEASE_SECONDS = 3.0


@pytest.mark.slow
def test_a_killed_workers_shard_runs_again_after_the_lease(tmp_path, redis_server, s3_store_url,
                                                           tiny_llama, queue):
    rows, shard_size = 2000, 100
    path = write_input(tmp_path, prompts_table(rows), row_group_size=shard_size)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    broker = redis.Redis.from_url(redis_server.url)
    # Four sequences at a time make a 100-row shard last about a second on this CPU.
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_LEASE_SECONDS=str(LEASE_SECONDS),
                     BATCHINFER_MAX_NUM_SEQS="4")
    args = ["--queues", queue]
    launchers = [WorkerProcess(env, tmp_path / f"{n}.log", f"{n}@%h", args, launcher=True)
                 for n in ("a", "b")]
    try:
        job = client.submit(path, model=str(tiny_llama), max_tokens=4, shard_size=shard_size,
                            id_column="id", queue=queue)
        seen: set[str] = set()

        def fresh_lease_of_a() -> dict | None:
            """A lease `a` took since the last look: its shard has just started."""
            for field, raw in broker.hgetall(LEASES_KEY).items():
                lease = json.loads(raw)
                if field in seen or lease["job_id"] != job.id:
                    continue
                seen.add(field)
                if lease["worker"].startswith("a@") and lease["shard_index"] > 0:
                    return lease
            return None

        lease = wait_for(fresh_lease_of_a, 120, "worker a taking a shard", interval=0.01)
        launchers[0].kill(signal.SIGKILL)  # the launcher and its worker: a lost machine
        killed_at = time.monotonic()
        shard = lease["shard_index"]
        part = keys.result_key(job.id, shard)
        assert not client.store.exists(part), "the shard finished before the kill"
        launchers.append(WorkerProcess(env, tmp_path / "c.log", "c@%h", args, launcher=True))

        # Until the lease expires, Redis holds the killed worker's delivery as unacknowledged:
        # on its own it would give it back only after the visibility timeout.
        assert [job.id, shard] in unacknowledged_shards(broker)
        wait_for(lambda: client.store.exists(part), 60, f"shard {shard} run again")
        recovered = time.monotonic() - killed_at
        status = job.wait(timeout=120)
        # The watchdog put that delivery back at the head of the queue, where the next
        # free worker took it: nothing is left for Redis to redeliver in 12 hours.
        assert [job.id, shard] not in unacknowledged_shards(broker)
    except BaseException:
        for launcher in launchers:
            print(f"--- {launcher.hostname} log ---\n{launcher.log()}")
        raise
    finally:
        for launcher in launchers:
            launcher.stop()

    print(f"\nkilled shard {shard}: results part {recovered:.1f}s after the kill "
          f"(lease {LEASE_SECONDS:.0f}s, visibility timeout {VISIBILITY_TIMEOUT_SECONDS}s)")
    assert recovered < 60 < VISIBILITY_TIMEOUT_SECONDS
    assert status["state"] == "completed", status
    assert status["counts"] == {"total_rows": rows, "succeeded_rows": rows, "failed_rows": 0,
                                "shards_total": rows // shard_size,
                                "shards_done": rows // shard_size}
    assert_exactly_once(client, job.id, {f"r{i:05d}" for i in range(rows)})
    usage = [read_table(client.store, key).to_pylist()[0]
             for key in client.store.list("usage/") if job.id in key]
    assert sorted(u["shard"] for u in usage) == list(range(rows // shard_size))
    assert not next(u for u in usage if u["shard"] == shard)["worker"].startswith("a@")
    assert "went silent" in "".join(w.log_path.read_text() for w in launchers[1:])
