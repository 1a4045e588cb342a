"""Real Celery worker processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import log_tail


class WorkerProcess:
    def __init__(self, env: dict, log_path: Path, hostname: str, extra_args: list[str]) -> None:
        self.log_path = log_path
        self.hostname = hostname
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
                 "--concurrency", "1", "--loglevel", "INFO", "--hostname", hostname, *extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return log_tail(self.log_path, 60)


@contextmanager
def running_workers(count: int, env: dict, log_dir: Path, extra_args: list[str] = (),
                    name: str = "w") -> Iterator[list[WorkerProcess]]:
    """Start `count` workers with the given environment; stop them (and show logs) after."""
    workers = [WorkerProcess(env, log_dir / f"{name}{i}.log", f"{name}{i}@%h", list(extra_args))
               for i in range(count)]
    try:
        yield workers
    except BaseException:
        for worker in workers:
            print(f"--- {worker.hostname} log ---\n{worker.log()}")
        raise
    finally:
        for worker in workers:
            worker.stop()


def worker_env(broker_url: str, store_url: str, **extra: str) -> dict:
    """The environment of a worker process: our servers, float32 for exact comparisons."""
    return os.environ | {
        "BATCHINFER_BROKER_URL": broker_url,
        "BATCHINFER_STORE_URL": store_url,
        "BATCHINFER_DTYPE": "float32",
        "BATCHINFER_KV_CACHE_MEMORY": "64MiB",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
