"""`batchinfer cancel` in the middle of a job: the job ends cancelled at once, the running
shard stops at its next engine step and writes nothing, queued shards do not run, rows
already written stay, and the counts are those of the parts in the store. Then one
`batchinfer retry` finishes the job: every row once, none of them an error."""

from __future__ import annotations

import ast
import json
import re
import time

import pyarrow as pa
import pytest
import redis

from jobs import keys, runner
from tests.reliability.helpers import (
    assert_exactly_once,
    cli_json,
    prompts_table,
    run_cli,
    wait_for,
    write_input,
)
from tests.worker_processes import WorkerProcess, running_workers, worker_env
from workers.client import Client
from workers.leases import LEASES_KEY


def shard_summaries(worker: WorkerProcess) -> list[str]:
    """What each shard task the worker ran returned, in the order they ended."""
    return re.findall(r"succeeded in [0-9.]+s: (\{.*\})", worker.log_path.read_text())


def holds_lease(broker: redis.Redis, job_id: str) -> bool:
    return any(json.loads(raw)["job_id"] == job_id for raw in broker.hvals(LEASES_KEY))


@pytest.mark.slow
def test_cancel_mid_job(tmp_path, redis_server, s3_store_url, tiny_llama, queue):
    rows, shard_size = 1200, 100
    shards = rows // shard_size
    # The first shard is short; the later ones run long enough (about 15 s each here) that
    # the cancel lands while the next one runs, however slowly the command line starts.
    table = prompts_table(rows).append_column(
        "max_tokens", pa.array([80] * shard_size + [400] * (rows - shard_size), pa.int64()))
    path = write_input(tmp_path, table, row_group_size=shard_size)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    broker = redis.Redis.from_url(redis_server.url)
    # One sequence at a time: a shard lasts as long as its rows' outputs, one after another.
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_MAX_NUM_SEQS="1")
    with running_workers(1, env, tmp_path, ["--queues", queue]) as [worker]:
        job = client.submit(path, model=str(tiny_llama), max_tokens=80, shard_size=shard_size,
                            id_column="id", queue=queue)
        results = keys.results_prefix(job.id)
        wait_for(lambda: len(client.store.list(results)) >= 1, 120, "a shard done")

        def running_shard() -> list[int]:
            """A shard of this job holding a lease whose part is not written yet."""
            done = {keys.part_of_key(k)[0] for k in client.store.list(results)}
            for raw in broker.hvals(LEASES_KEY):
                lease = json.loads(raw)
                if lease["job_id"] == job.id and lease["shard_index"] not in done:
                    return [lease["shard_index"]]
            return []

        [running] = wait_for(running_shard, 60, "the next shard starting", interval=0.01)
        cli_env = env | {"BATCHINFER_BROKER_URL": redis_server.url,
                         "BATCHINFER_STORE_URL": s3_store_url}
        cancelled = run_cli("cancel", job.id, env=cli_env)
        cancelled_at = time.monotonic()
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"job {job.id} cancelled"
        # The running shard lets go of its lease when it stops.
        wait_for(lambda: not holds_lease(broker, job.id), 30, "the shard stopping")
        stopped = time.monotonic() - cancelled_at
        wait_for(lambda: broker.llen(queue) == 0, 60, "the queued shards being taken")
        # Every shard task ends exactly once, cancelled or not; the last one taken may still
        # be checking the store when the queue empties.
        wait_for(lambda: len(shard_summaries(worker)) == shards, 60, "every shard task ending")
        ended = shard_summaries(worker)

    status = job.status()
    parts = client.store.list(results)
    done = sorted(keys.part_of_key(k)[0] for k in parts)
    print(f"\ncancelled with shard {running} running: it stopped {stopped:.1f}s later; "
          f"{len(done)}/{shards} shards had finished")
    assert status["state"] == "cancelled"
    assert running not in done, "the running shard wrote its part after the cancel"
    assert stopped < 10
    assert 1 <= len(done) < shards
    assert status["counts"]["shards_done"] == len(done)
    assert status["counts"]["succeeded_rows"] == job.results().num_rows == len(done) * shard_size
    assert status["counts"]["failed_rows"] == 0
    # Every shard after the cancel returned at once without running; no usage beyond the parts.
    assert sum("'cancelled': True" in s for s in ended) == shards - len(done)
    usage = [k for k in client.store.list("usage/") if job.id in k]
    assert sorted(keys.part_of_key(k)[0] for k in usage) == done
    # A second cancel changes nothing.
    again = run_cli("cancel", job.id, env=cli_env)
    assert again.returncode == 0 and again.stdout.strip() == f"job {job.id} cancelled"


@pytest.mark.slow
def test_one_retry_after_a_cancel_finishes_the_job(tmp_path, redis_server, s3_store_url,
                                                   tiny_llama, queue):
    """The worker's next shard after the cancel is the rerun of the cancelled one, on the
    same engine, where the cancelled run's requests were aborted. One shard at a time
    (BATCHINFER_WORKER_SHARDS=1), so that shard 2 starts only after the cancel."""
    max_num_seqs = 256
    # The whole shard is in flight at once, so every row still running at the cancel is
    # one the rerun also has in flight at its first step.
    shard_size = runner.IN_FLIGHT_PER_SEQ_SLOT * max_num_seqs
    rows = 3 * shard_size
    # Shards 0 and 2 take a moment; shard 1 runs for seconds (about 7 s here), so the cancel
    # lands while its rows run.
    max_tokens = [4] * shard_size + [450] * shard_size + [4] * shard_size
    table = prompts_table(rows).append_column("max_tokens", pa.array(max_tokens, pa.int64()))
    path = write_input(tmp_path, table, row_group_size=shard_size)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    broker = redis.Redis.from_url(redis_server.url)
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_MAX_NUM_SEQS=str(max_num_seqs),
                     BATCHINFER_WORKER_SHARDS="1")
    with running_workers(1, env, tmp_path, ["--queues", queue]) as [worker]:
        job = client.submit(path, model=str(tiny_llama), shard_size=shard_size,
                            id_column="id", queue=queue)
        # The shard writes its first progress once its rows are going into the engine.
        wait_for(lambda: client.store.exists(keys.progress_key(job.id, 1)), 120,
                 "shard 1 running", interval=0.01)
        assert job.cancel()["state"] == "cancelled"  # what `batchinfer cancel` does
        wait_for(lambda: not holds_lease(broker, job.id), 30, "shard 1 stopping")
        # Shard 2's first delivery is skipped before the retry clears the cancel.
        wait_for(lambda: len(shard_summaries(worker)) == 3, 60, "every shard task ending")
        first_run = [ast.literal_eval(summary) for summary in shard_summaries(worker)]
        assert [(s["shard"], s["cancelled"]) for s in first_run] == [
            (0, False), (1, True), (2, True)]
        assert first_run[1]["rows"] == shard_size, "shard 1 was cancelled while it ran"
        assert job.status()["counts"]["succeeded_rows"] == shard_size

        cli_env = env | {"BATCHINFER_BROKER_URL": redis_server.url,
                         "BATCHINFER_STORE_URL": s3_store_url}
        plan = cli_json("retry", job.id, "--wait", env=cli_env)
        assert (plan["whole_shards"], plan["rows"]) == ([1, 2], 0)

    status = job.status()
    assert status["state"] == "completed", status
    assert status["counts"]["failed_rows"] == 0
    assert_exactly_once(client, job.id, set(table.column("id").to_pylist()))
    assert client.store.list(keys.errors_prefix(job.id)) == [], "rows failed (request aborted)"
