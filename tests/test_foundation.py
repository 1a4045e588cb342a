"""The test servers work: a Celery task round-trips through the test Redis via a real
worker process, and an object round-trips through the moto S3 server with boto3."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3

from tests.servers import log_tail


def test_celery_task_round_trips_through_test_redis(redis_server, tmp_path):
    env = dict(os.environ, ECHO_BROKER_URL=redis_server.url)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_echo", "worker",
             "--pool", "solo", "--concurrency", "1", "--without-mingle", "--without-gossip",
             "--loglevel", "INFO"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        os.environ["ECHO_BROKER_URL"] = redis_server.url
        from tests.celery_echo import app

        result = app.send_task("echo.add", args=(2, 40))
        assert result.get(timeout=60) == 42, log_tail(log)
    finally:
        worker.terminate()
        worker.wait(30)
        os.environ.pop("ECHO_BROKER_URL", None)


def test_object_round_trips_through_moto_s3(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    s3.put_object(Bucket=s3_server.bucket, Key="hello/world.txt", Body=b"batchinfer")
    body = s3.get_object(Bucket=s3_server.bucket, Key="hello/world.txt")["Body"].read()
    assert body == b"batchinfer"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="hello/")["Contents"]]
    assert keys == ["hello/world.txt"]
