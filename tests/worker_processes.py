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
from workers.launcher import celery_worker_argv


class WorkerProcess:
    """A Celery worker (launcher=False: `celery worker` itself, the process that runs the
    tasks) or a `batchinfer worker --gpus none` launcher (its child runs the tasks; the
    launcher runs the shard watchdog). Either way in its own process group."""

    def __init__(self, env: dict, log_path: Path, hostname: str, extra_args: list[str],
                 launcher: bool = False) -> None:
        self.log_path = log_path
        self.hostname = hostname
        if launcher:
            command = [sys.executable, "-m", "workers.cli", "worker", "--gpus", "none",
                       "--hostname", hostname, *extra_args]
        else:
            command = celery_worker_argv("--hostname", hostname, *extra_args, environ=env)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_ready(self) -> bool:
        """Celery logged that it is consuming."""
        try:
            return " ready." in self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False

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
                    name: str = "w", launcher: bool = False) -> Iterator[list[WorkerProcess]]:
    """Start `count` workers with the given environment; stop them (and show logs) after."""
    workers = [WorkerProcess(env, log_dir / f"{name}{i}.log", f"{name}{i}@%h", list(extra_args),
                             launcher=launcher)
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
