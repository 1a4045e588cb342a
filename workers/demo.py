"""`batchinfer demo`: a whole batch job on embedded defaults — no Redis, no S3, no network.

It writes a sample Parquet file of story prompts, starts a Celery worker subprocess over
the local-disk broker, submits the file, follows it with a progress bar, prints a few
result rows and the usage summary, and stops the worker.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.random_model import make_tiny_model
from jobs import settings
from jobs.manifest import JobState
from workers.client import Client
from workers.launcher import celery_worker_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_STORIES = REPO_ROOT.parent / "shared" / "models" / "stories260K"

_OPENINGS = ["Once upon a time, there was a little", "One day, a happy", "Lily and Tom found a",
             "In the park, a small", "The big red", "A little girl named Sue saw a"]
_THINGS = ["dog", "cat", "bird", "ball", "tree", "boat", "cake", "frog", "car", "flower"]


def sample_prompts(rows: int, seed: int = 0) -> pa.Table:
    """Story openings with an id, a pass-through column and a per-row max_tokens override."""
    rng = random.Random(seed)
    prompts = [f"{rng.choice(_OPENINGS)} {rng.choice(_THINGS)}" for _ in range(rows)]
    return pa.table({
        "id": [f"row-{i:05d}" for i in range(rows)],
        "prompt": prompts,
        "topic": [p.rsplit(" ", 1)[-1] for p in prompts],
        "max_tokens": [rng.choice([32, 64, 96, 128]) for _ in range(rows)],
    })


def demo_model(home: Path) -> Path:
    if (SHARED_STORIES / "config.json").is_file():
        return SHARED_STORIES
    folder = home / "models" / "tiny-random-llama"
    if not (folder / "config.json").is_file():
        print("stories260K not found: building a random-weight model (its text is noise)",
              file=sys.stderr)
        make_tiny_model(folder)
    return folder


def start_worker(home: Path, env: dict) -> subprocess.Popen:
    log = open(home / "demo-worker.log", "ab")  # noqa: SIM115 - the worker owns it until stopped
    return subprocess.Popen(
        celery_worker_argv("--without-mingle", "--without-gossip", "--hostname", "demo-cpu@%h"),
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def run_demo(model: str | None = None, rows: int = 300) -> int:
    # The embedded defaults, whatever this shell has configured.
    for var in ("BATCHINFER_BROKER_URL", "BATCHINFER_STORE_URL"):
        os.environ.pop(var, None)
    home = settings.home()
    home.mkdir(parents=True, exist_ok=True)
    model_path = Path(model) if model else demo_model(home)
    input_path = home / "demo-prompts.parquet"
    pq.write_table(sample_prompts(rows), input_path, row_group_size=100)
    print(f"model: {model_path}\ninput: {input_path} ({rows} rows)\nstore: {settings.store_url()}",
          file=sys.stderr)

    worker = start_worker(home, dict(os.environ))
    try:
        job = Client().submit(input_path, model=str(model_path), max_tokens=128, shard_size=100)
        print(f"job: {job.id}", file=sys.stderr)
        status = job.wait(progress=True, poll_seconds=0.5, check=_worker_alive(worker, home))
    finally:
        worker.terminate()
        worker.wait(60)

    if status["state"] != JobState.COMPLETED:
        print(f"job {status['state']}: {status.get('reason', '')}", file=sys.stderr)
        return 1
    _show(job.results(), status, model_path)
    return 0


def _worker_alive(worker: subprocess.Popen, home: Path):
    def check() -> None:
        if worker.poll() is not None:
            raise SystemExit(f"the demo worker exited; see {home / 'demo-worker.log'}")

    return check


def _show(results: pa.Table, status: dict, model_path: Path) -> None:
    print("\nfirst results:")
    for row in results.slice(0, 3).to_pylist():
        text = " ".join(row["output"].split())
        print(f"  {row['id']} [{row['finish_reason']}, {row['completion_tokens']} tokens] "
              f"{text[:110]}")
    counts, usage = status["counts"], status["usage"]
    print(f"\njob {status['job_id']} completed: {counts['succeeded_rows']} rows ok, "
          f"{counts['failed_rows']} failed")
    print(f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated "
          f"({usage['cached_tokens']} prompt tokens from the prefix cache)")
    print(f"speed: {usage['tokens_per_second']:.0f} tokens/s (prompt + generated), "
          f"occupancy {usage['occupancy']:.0%} of the batch's sequences, "
          f"{usage['mean_tokens_per_step']:.0f} tokens per step, busy {usage['busy_seconds']:.1f} s")
    print(f"cost: ${usage['cost_usd']:.6f} (${usage['cost_per_million_tokens']:.4f} per 1M tokens "
          f"at BATCHINFER_GPU_HOURLY_USD={settings.gpu_hourly_usd()})")
    job_id = status["job_id"]
    print(f"\nThe job is in the embedded store, {settings.store_url()}. From this folder:\n"
          f"  batchinfer status {job_id}\n"
          f"  batchinfer results {job_id} -o results.parquet\n"
          f"  batchinfer errors {job_id}\n"
          f"Your own file: start a worker (batchinfer worker) in one terminal, then\n"
          f"  batchinfer submit prompts.parquet --model {model_path} --wait -o out.parquet")
