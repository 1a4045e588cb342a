"""The object store failing under a running job.

- Unreachable for a few seconds (a TCP proxy between the workers and the moto server drops
  every connection and refuses new ones): botocore's retries, the runner's best-effort
  progress writes and the worker's own backoff carry the job through.
- A permanent error (IAM denies the workers writing results): the shard fails at once,
  not after minutes of retries, with the reason, and `batchinfer status` shows it.
"""

from __future__ import annotations

import json
import re
import time

import boto3
import pytest

from tests.reliability.helpers import (
    assert_exactly_once,
    prompts_table,
    run_cli,
    wait_for,
    write_input,
)
from tests.servers import MotoS3Server, TcpProxy
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

OUTAGE_SECONDS = 5.0


@pytest.fixture
def s3_proxy(s3_server):
    proxy = TcpProxy(s3_server.port)
    yield proxy
    proxy.stop()


@pytest.mark.slow
def test_a_job_rides_out_an_s3_outage(tmp_path, redis_server, s3_store_url, s3_proxy,
                                      tiny_llama, queue):
    rows, shard_size = 400, 40
    path = write_input(tmp_path, prompts_table(rows), row_group_size=shard_size)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)  # direct to moto
    env = worker_env(redis_server.url, s3_store_url, AWS_ENDPOINT_URL=s3_proxy.url,
                     BATCHINFER_MAX_NUM_SEQS="4")
    with running_workers(2, env, tmp_path, ["--queues", queue]) as workers:
        job = client.submit(path, model=str(tiny_llama), max_tokens=4, shard_size=shard_size,
                            id_column="id", queue=queue)
        results = f"jobs/{job.id}/results/"
        wait_for(lambda: len(client.store.list(results)) >= 2, 120, "two shards done")
        s3_proxy.outage()
        # A write the proxy had passed on whole before the cut still lands at the server:
        # counted before the outage, not during it.
        time.sleep(1.0)
        before = len(client.store.list(results))
        time.sleep(OUTAGE_SECONDS)
        during = len(client.store.list(results)) - before
        s3_proxy.restore()
        restored_at = time.monotonic()
        status = job.wait(timeout=120)
        after = time.monotonic() - restored_at
        logs = "".join(w.log_path.read_text() for w in workers)
    print(f"\nS3 cut off for {OUTAGE_SECONDS:.0f}s at {before}/{rows // shard_size} shards; "
          f"{during} written meanwhile; job completed {after:.1f}s after S3 came back")
    assert status["state"] == "completed", status
    assert during == 0, "the workers could still write: the outage was not one"
    assert_exactly_once(client, job.id, {f"r{i:05d}" for i in range(rows)})
    assert status["counts"]["failed_rows"] == 0
    # Shards that were running when S3 went away waited for it (botocore retrying each
    # request with backoff) instead of failing.
    took = [float(t) for t in re.findall(r"run_shard\[[^]]+\] succeeded in ([0-9.]+)s", logs)]
    assert max(took) > OUTAGE_SECONDS - 1, took
    assert "could not reach the store" not in logs and " failed: " not in logs


def _iam_user(iam, name: str, statements: list[dict]) -> dict[str, str]:
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture
def iam_s3(tmp_path, s3_server):
    """A moto server of its own that checks credentials and IAM policies after its first
    seven requests (the bucket and two users with their keys and policies): an admin, and
    workers that may do anything but write results."""
    server = MotoS3Server(tmp_path / "moto-iam", env={"INITIAL_NO_AUTH_ACTION_COUNT": "7"})
    server.start()  # creates the bucket: request 1
    iam = boto3.client("iam", endpoint_url=server.endpoint_url)
    admin = _iam_user(iam, "admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])
    workers = _iam_user(iam, "workers", [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:PutObject",
         "Resource": f"arn:aws:s3:::{server.bucket}/*/results/*"}])
    yield server, admin, workers
    server.stop()


@pytest.mark.slow
def test_a_permanent_s3_error_fails_the_shard_with_the_reason(tmp_path, redis_server, iam_s3,
                                                              tiny_llama, queue, monkeypatch):
    server, admin, workers_keys = iam_s3
    store_url = f"s3://{server.bucket}/denied"
    for name, value in {**admin, "AWS_ENDPOINT_URL": server.endpoint_url}.items():
        monkeypatch.setenv(name, value)
    client = Client(store_url=store_url, broker_url=redis_server.url)
    path = write_input(tmp_path, prompts_table(40))
    env = worker_env(redis_server.url, store_url, **workers_keys)
    with running_workers(1, env, tmp_path, ["--queues", queue]):
        job = client.submit(path, model=str(tiny_llama), max_tokens=3, shard_size=20,
                            id_column="id", queue=queue)
        started = time.monotonic()
        status = job.wait(timeout=120)
        took = time.monotonic() - started
    assert status["state"] == "failed", status
    assert "AccessDenied" in status["reason"] and "PutObject" in status["reason"], status
    assert took < 60, "a permanent error is not retried for minutes"
    shown = run_cli("status", job.id, env=env | admin | {"BATCHINFER_STORE_URL": store_url})
    assert shown.returncode == 0, shown.stderr
    assert f"job {job.id} failed" in shown.stdout and "AccessDenied" in shown.stdout
    assert client.store.list(f"jobs/{job.id}/results/") == []
    # The secret keys appear nowhere the job wrote.
    for key in client.store.list(f"jobs/{job.id}/"):
        body = client.store.get_bytes(key)
        assert workers_keys["AWS_SECRET_ACCESS_KEY"].encode() not in body, key
