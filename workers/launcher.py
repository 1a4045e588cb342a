"""`batchinfer worker`: one Celery worker process per GPU, or one CPU worker.

Each GPU gets its own process pinned with CUDA_VISIBLE_DEVICES and a hostname that names
the GPU, so Flower shows which card runs which shard. A process holds one engine and runs
BATCHINFER_WORKER_SHARDS shard deliveries at once, each in a thread of a Celery threads
pool, all feeding that one engine (engine/shared.py): while one shard's last long rows
run, the next shard's rows fill the batch instead of the device idling. More engines per
GPU would only compete for its memory. The default is 2 on a GPU, where a step's time is
in kernels that release the GIL, and 1 on a CPU: there (stories260K, 2 cores) a step is
mostly Python, and a second shard's reading and writing competed with the stepping thread
for the GIL: two at once measured no faster than one (scripts/service_bench.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from jobs.settings import env_whole_number

log = logging.getLogger(__name__)


def detect_gpus() -> list[str]:
    """GPU indexes visible to this machine, without initialising CUDA in this process."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse_gpus(spec: str | None) -> list[str]:
    """`--gpus all` (or none given): every GPU found; `--gpus 0,2`: those; `--gpus none`: CPU."""
    if spec is None or spec == "all":
        return detect_gpus()
    if spec == "none":
        return []
    gpus = [part.strip() for part in spec.split(",") if part.strip()]
    if not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus takes 'all', 'none' or indexes like 0,1; got {spec!r}")
    return gpus


DEFAULT_WORKER_SHARDS = {"gpu": 2, "cpu": 1}  # why: the module docstring


def worker_shards(environ: Mapping[str, str] = os.environ, gpu: bool = False) -> int:
    """BATCHINFER_WORKER_SHARDS: the shards one worker process runs at once (default 2 on
    a GPU, 1 on a CPU)."""
    return env_whole_number("BATCHINFER_WORKER_SHARDS",
                            DEFAULT_WORKER_SHARDS["gpu" if gpu else "cpu"], environ, minimum=1)


def celery_worker_argv(*extra: str, environ: Mapping[str, str] = os.environ,
                       gpu: bool = False) -> list[str]:
    """The command line of one worker process: a threads pool of worker_shards(environ, gpu)
    threads (shards that run at once, into the process's one engine: the second delivery
    fills the batch while the first's tail runs), then extra (hostname, queues, any
    `celery worker` option). environ: the environment the worker will run in."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "threads",
            "--concurrency", str(worker_shards(environ, gpu)), "--loglevel", "INFO", *extra]


def worker_commands(gpus: list[str], celery_args: list[str]) -> list[tuple[dict, list[str]]]:
    """(environment changes, argv) for each worker process to start."""
    has_hostname = any(a == "--hostname" or a.startswith(("--hostname=", "-n")) for a in celery_args)
    host = socket.gethostname()
    if not gpus:
        name = [] if has_hostname else ["--hostname", f"cpu@{host}"]
        return [({}, celery_worker_argv(*name, *celery_args))]
    commands = []
    for gpu in gpus:
        name = [] if has_hostname and len(gpus) == 1 else ["--hostname", f"gpu{gpu}@{host}"]
        commands.append(({"CUDA_VISIBLE_DEVICES": gpu},
                         celery_worker_argv(*name, *celery_args, gpu=True)))
    return commands


def _watchdog(stop: threading.Event) -> None:
    """Re-queue shards whose worker went silent (any worker host may do it; claims are atomic)."""
    from workers.leases import lease_seconds
    from workers.watchdog import requeue_expired_shards

    while not stop.wait(lease_seconds() / 4):
        try:
            requeue_expired_shards()
        except Exception as exc:  # Redis restarting, say: the next pass tries again
            log.warning("watchdog pass failed: %s", exc)


def run_workers(gpus: list[str], celery_args: list[str]) -> int:
    """Start the workers and the shard watchdog, pass SIGINT/SIGTERM on, and return when
    all workers have exited."""
    procs = [subprocess.Popen(argv, env=os.environ | env) for env, argv in worker_commands(gpus, celery_args)]
    stop = threading.Event()
    threading.Thread(target=_watchdog, args=(stop,), name="watchdog", daemon=True).start()

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(proc.poll() is None for proc in procs):
        time.sleep(0.5)
    stop.set()
    return max(proc.returncode or 0 for proc in procs)
