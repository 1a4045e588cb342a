"""Shared pieces of the fault-injection tests: a queue of its own per test (so that no other
test's workers take its shards), prompt tables, waiting, and the exactly-once check."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from jobs.client import Client
from tests.servers import RedisServer
from tests.workers import WorkerProcess, worker_env
from workers.beat import NIGHTLY_QUEUE

WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()


@pytest.fixture
def queue() -> str:
    """A Celery queue for this test's shards and workers only."""
    return f"q-{uuid.uuid4().hex[:10]}"


def prompt(i: int, words: int = 0) -> str:
    count = words or 1 + i % 11
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(count))


def prompts_table(rows: int, words: int = 0) -> pa.Table:
    return pa.table({"id": [f"r{i:05d}" for i in range(rows)],
                     "prompt": [prompt(i, words) for i in range(rows)]})


def write_input(tmp_path: Path, table: pa.Table, name: str = "prompts.parquet",
                row_group_size: int | None = None) -> Path:
    path = tmp_path / name
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05, check: Callable[[], None] | None = None):
    """predicate()'s first truthy value, polled; TimeoutError naming what after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        if check is not None:
            check()
        time.sleep(interval)


def assert_exactly_once(client: Client, job_id: str, expected_ids: set[str]) -> pa.Table:
    """Every expected row in the results once, none twice, nothing else, in input order;
    the manifest's counts agree."""
    results = client.job(job_id).results()
    ids = results.column("id").to_pylist()
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"rows in the results twice: {twice[:5]}"
    assert set(ids) == expected_ids, (
        f"missing {sorted(expected_ids - set(ids))[:5]}, "
        f"extra {sorted(set(ids) - expected_ids)[:5]}")
    assert ids == sorted(ids), "results are in input order"
    status = client.job(job_id).status()
    assert status["counts"]["succeeded_rows"] == len(expected_ids), status["counts"]
    return results


def unacknowledged_shards(broker: redis.Redis) -> list[list]:
    """[job_id, shard] of each run_shard message Redis holds as delivered but not acked."""
    shards = []
    for raw in broker.hvals("unacked"):  # kombu: delivery tag -> [message, exchange, key]
        message = json.loads(raw)[0]
        if message["headers"].get("task") == "batchinfer.run_shard":
            args = json.loads(base64.b64decode(message["body"]))[0]
            shards.append(args[:2])
    return shards


def run_cli(*args: str, env: dict | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def cli_json(*args: str, env: dict | None = None) -> dict:
    done = run_cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class SecureStack:
    """A password-protected, TLS-only redis-server and one worker on it that serves a queue
    of its own and the nightly queue, with model paths confined to one folder."""

    redis: RedisServer
    env: dict
    worker: WorkerProcess
    queue: str
    password: str
    aws_secret: str
    model_root: Path

    def cli_env(self, store_url: str) -> dict:
        return self.env | {"BATCHINFER_STORE_URL": store_url}


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory, s3_server, tiny_llama) -> Iterator[SecureStack]:
    workdir = tmp_path_factory.mktemp("secure")
    password = f"pw-{uuid.uuid4().hex}"
    server = RedisServer(workdir / "redis", password=password, tls=True)
    server.start()
    root = workdir / "model-root"
    shutil.copytree(tiny_llama, root / "tiny")
    (root / "leads-outside").symlink_to(tiny_llama, target_is_directory=True)
    registry = workdir / "models.json"
    registry.write_text(json.dumps({"tiny": str(root / "tiny"), "escape": "/etc",
                                    "sneaky": str(root / "leads-outside")}))
    aws_secret = f"aws-secret-{uuid.uuid4().hex}"
    queue = f"secure-{uuid.uuid4().hex[:8]}"
    env = worker_env(server.url, f"s3://{s3_server.bucket}/secure",
                     BATCHINFER_MODEL_ROOTS=str(root), BATCHINFER_MODELS=str(registry),
                     AWS_SECRET_ACCESS_KEY=aws_secret, BATCHINFER_LEASE_SECONDS="2")
    worker = WorkerProcess(env, workdir / "worker.log", "secure@%h",
                           ["--queues", f"{queue},{NIGHTLY_QUEUE}"])
    try:
        wait_for(worker.is_ready, 120, "the worker on the TLS Redis",
                 check=lambda: _still_running(worker))
        yield SecureStack(server, env, worker, queue, password, aws_secret, root)
    finally:
        worker.stop()
        server.stop()


def _still_running(worker: WorkerProcess) -> None:
    if worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited:\n{worker.log()}")
