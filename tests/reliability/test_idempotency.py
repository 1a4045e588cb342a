"""Idempotent submits: a key already used gives back its job, however many submits race
for it (separate `batchinfer submit` processes, threads of one client), and a key whose
first submit was invalid is free again. Shards are queued once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pytest
import redis

from jobs import keys
from jobs.errors import UserError
from jobs.store import get_json
from tests.reliability.helpers import prompts_table, write_input
from workers.client import Client


@pytest.fixture(params=["s3", "file"])
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


def test_racing_submits_with_one_key_make_one_job(tmp_path, redis_server, store_url, queue):
    path = write_input(tmp_path, prompts_table(30))
    broker = redis.Redis.from_url(redis_server.url)
    env = {"BATCHINFER_STORE_URL": store_url, "BATCHINFER_BROKER_URL": redis_server.url}
    command = [sys.executable, "-m", "workers.cli", "submit", str(path), "--model", "m",
               "--shard-size", "10", "--queue", queue, "--idempotency-key", "nightly-2024-05-01",
               "--json"]
    procs = [subprocess.Popen(command, env=os.environ | env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    ids = {json.loads(out)["job_id"] for out, _ in outs}
    assert len(ids) == 1
    [job_id] = ids

    client = Client(store_url=store_url, broker_url=redis_server.url)
    threads_ids: list[str] = []

    def submit() -> None:
        threads_ids.append(client.submit(path, model="m", shard_size=10, queue=queue,
                                         idempotency_key="nightly-2024-05-01").id)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(threads_ids) == {job_id}

    assert client.store.list_dirs(keys.JOBS_PREFIX) == [job_id]
    assert broker.llen(queue) == 3  # its three shards, queued once
    index = get_json(client.store, keys.idempotency_key("nightly-2024-05-01"))
    assert index["job_id"] == job_id and index["queued"] is True
    assert "nightly-2024-05-01" not in keys.idempotency_key("nightly-2024-05-01")

    other = client.submit(path, model="m", shard_size=10, queue=queue, idempotency_key="other")
    assert other.id != job_id and broker.llen(queue) == 6


def test_a_key_whose_submit_was_invalid_can_be_used_again(tmp_path, redis_server,
                                                          file_store_url, queue):
    client = Client(store_url=file_store_url, broker_url=redis_server.url)
    bad = write_input(tmp_path, pa.table({"text": ["no prompt column"]}), "bad.parquet")
    with pytest.raises(UserError, match="no column 'prompt'"):
        client.submit(bad, model="m", queue=queue, idempotency_key="k")
    assert client.store.list("idempotency/") == []
    good = write_input(tmp_path, prompts_table(3), "good.parquet")
    job = client.submit(good, model="m", queue=queue, idempotency_key="k")
    assert client.submit(bad, model="m", queue=queue, idempotency_key="k").id == job.id
