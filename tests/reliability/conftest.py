"""Fixtures of the fault-injection tests: a queue of its own per test (so that no other
test's workers take its shards) and a TLS, password-protected Redis with a worker on it.
Their helpers are in tests/reliability/helpers.py."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.helpers import wait_for
from tests.servers import RedisServer
from tests.worker_processes import WorkerProcess, worker_env
from workers.beat import NIGHTLY_QUEUE


@pytest.fixture
def queue() -> str:
    """A Celery queue for this test's shards and workers only."""
    return f"q-{uuid.uuid4().hex[:10]}"


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
