"""One worker process runs two shard deliveries at once into its one engine
(BATCHINFER_WORKER_SHARDS, workers/launcher.py), over real Redis, S3 (moto) and a real
worker: the shards' engine runs overlap in time, which a solo pool cannot do, and their
usage still counts the engine's time once."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.compute as pc

from jobs.tables import read_table
from tests.reliability.helpers import assert_exactly_once, write_input
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

JOB_TIMEOUT = 300
SHARD_ROWS = 16
WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()


def test_one_worker_runs_two_shards_at_once(tmp_path, redis_server, s3_store_url, tiny_llama):
    queue = f"q-{uuid.uuid4().hex[:10]}"
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    rows = 2 * SHARD_ROWS
    table = pa.table({
        "id": [f"r{i:03d}" for i in range(rows)],
        "prompt": [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))
                   for i in range(rows)],
    })
    # Long enough rows that each shard's engine time far outlasts the gap between the two
    # threads starting theirs.
    job = client.submit(write_input(tmp_path, table, row_group_size=SHARD_ROWS),
                        model=str(tiny_llama), max_tokens=480, id_column="id",
                        shard_size=SHARD_ROWS, queue=queue)
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_WORKER_SHARDS="2")
    with running_workers(1, env, tmp_path, ["--queues", queue]):
        status = job.wait(timeout=JOB_TIMEOUT)
    assert status["state"] == "completed", status
    assert_exactly_once(client, job.id, set(table.column("id").to_pylist()))

    store = client.store
    usage = pa.concat_tables([read_table(store, key) for key in store.list("usage/")
                              if job.id in key]).sort_by("shard").to_pylist()
    assert [record["shard"] for record in usage] == [0, 1]
    first, second = usage
    # Both shards' rows were in the engine at the same time: their runs overlap.
    assert first["started_at"] < second["finished_at"]
    assert second["started_at"] < first["finished_at"]
    # Each counts its share of the engine's steps, not the wall time they overlap in.
    span = (max(r["finished_at"] for r in usage)
            - min(r["started_at"] for r in usage)).total_seconds()
    assert pc.sum(pa.array([r["busy_seconds"] for r in usage])).as_py() <= span + 0.1
