"""Measure the fixed cost of a shard: S3 requests and wall time outside the engine.

Starts its own moto S3 server, submits one job of SHARDS shards of a few short rows, and
runs every shard in this process through the real Celery task (`workers.tasks.run_shard`
applied eagerly), one after another, counting each S3 request by operation. Prints JSON:

    python scripts/shard_overhead.py --shards 200 [--rows-per-shard 4] [--max-tokens 1]

Per shard: requests by operation (the mean over all shards, the first and the last, and
the shards in between), and the requests of the task after the runner returned (the "is
the job complete?" check, and for the last shard the finalize). Overhead = the task's
wall time minus the engine's busy time from the shard's usage record. The model is
../shared/models/stories260K where present, else a random tiny Llama built here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED_MODEL = ROOT.parent / "shared" / "models" / "stories260K"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8")
WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()


def cpu() -> dict:
    """The CPU model and which of the flags that matter for kernels it has."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(f for f in CPU_FLAGS if f in flags),
            "cores": os.cpu_count()}


class RequestCounter:
    """Counts every botocore API call made in this process, by operation, into `current`."""

    def __init__(self) -> None:
        self.current: Counter | None = None

    def install(self) -> None:
        from botocore.client import BaseClient

        original = BaseClient._make_api_call
        counter = self

        def counted(client, operation_name, api_params):
            if counter.current is not None:
                counter.current[operation_name] += 1
            return original(client, operation_name, api_params)

        BaseClient._make_api_call = counted


def phase_marker(counter: RequestCounter, marks: list):
    """Wrap jobs.runner.run_shard so that the requests made before it returned are noted:
    what the task makes after it is its completion check (and finalize)."""
    from jobs import runner

    original = runner.run_shard

    def marked(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            marks.append(Counter(counter.current))

    runner.run_shard = marked


def make_input(shards: int, rows_per_shard: int, words: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = shards * rows_per_shard
    table = pa.table({
        "id": [f"r{i:07d}" for i in range(rows)],
        "prompt": [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
                   for i in range(rows)],
    })
    pq.write_table(table, path, row_group_size=rows_per_shard)


def model_path(scratch: Path, wanted: str | None) -> str:
    if wanted:
        return str(Path(wanted).resolve())
    if (SHARED_MODEL / "config.json").is_file():
        return str(SHARED_MODEL)
    from engine.random_model import make_tiny_model

    return str(make_tiny_model(scratch / "tiny-model", arch="llama", shape="tiny"))


def summarize(counts: list[Counter]) -> dict:
    if not counts:
        return {}
    operations = sorted(set().union(*counts))
    by_op = {op: round(sum(c[op] for c in counts) / len(counts), 2) for op in operations}
    return {"total": round(sum(by_op.values()), 2), "by_operation": by_op}


def run(args: argparse.Namespace, scratch: Path) -> dict:
    from tests.servers import MotoS3Server

    os.environ.update({"BATCHINFER_HOME": str(scratch / "home"), "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    for variable in ("BATCHINFER_BROKER_URL", "BATCHINFER_STORE_URL", "AWS_PROFILE"):
        os.environ.pop(variable, None)
    server = MotoS3Server(scratch / "moto")
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
    server.start()
    try:
        return measure(args, scratch, f"s3://{server.bucket}/overhead")
    finally:
        server.stop()


def measure(args: argparse.Namespace, scratch: Path, store_url: str) -> dict:
    import torch

    from jobs.manifest import load_manifest
    from jobs.models import resolve_model
    from jobs.spec import JobSpec
    from jobs.store import open_store
    from jobs.submit import create_job
    from jobs.usage import job_usage_parts
    from workers.engine_cache import engine_client
    from workers.tasks import run_shard

    torch.set_num_threads(args.threads)
    model = model_path(scratch, args.model)
    store = open_store(store_url)
    source = scratch / "prompts.parquet"
    make_input(args.shards, args.rows_per_shard, args.words, source)
    job_id, shards = create_job(store, source, JobSpec(
        model=model, id_column="id", max_tokens=args.max_tokens,
        shard_size=args.rows_per_shard))
    assert len(shards) == args.shards, (len(shards), args.shards)
    with engine_client(resolve_model(model)):  # loaded once per worker process:
        pass  # not a shard's cost

    counter = RequestCounter()
    counter.install()
    marks: list[Counter] = []
    phase_marker(counter, marks)
    per_shard, after_runner, walls = [], [], []
    started = time.monotonic()
    for index in range(args.shards):
        counter.current = Counter()
        marks.clear()
        begin = time.perf_counter()
        result = run_shard.apply(args=(job_id, index, args.shards, store_url))
        walls.append(time.perf_counter() - begin)
        summary = result.get()
        if summary.get("error") or summary.get("cancelled"):
            raise RuntimeError(f"shard {index}: {summary}")
        total = counter.current
        per_shard.append(total)
        after_runner.append(total - marks[0] if marks else Counter())
    counter.current = None
    elapsed = time.monotonic() - started

    job = load_manifest(store, job_id)
    today = datetime.now(UTC).date()
    usage = job_usage_parts(store, job_id, datetime.fromisoformat(job["created_at"]).date(),
                            today)
    busy = [usage[(index, 0)].busy_seconds for index in range(args.shards)]
    overhead = [wall - engine for wall, engine in zip(walls, busy, strict=True)]
    middle = per_shard[1:-1]
    return {
        "cpu": cpu(),
        "python": platform.python_version(),
        "torch_threads": args.threads,
        "model": model,
        "shards": args.shards,
        "rows_per_shard": args.rows_per_shard,
        "max_tokens": args.max_tokens,
        "job": {"state": job["state"], "counts": job["counts"]},
        "requests_per_shard": {
            "all_shards": summarize(per_shard),
            "first_shard": summarize(per_shard[:1]),
            "middle_shards": summarize(middle),
            "last_shard": summarize(per_shard[-1:]),
            "middle_shards_max": max((sum(c.values()) for c in middle), default=0),
        },
        "completion_check_requests": {
            "middle_shards": summarize(after_runner[1:-1]),
            "last_shard": summarize(after_runner[-1:]),
        },
        "seconds_per_shard": {
            "wall_mean": round(statistics.fmean(walls), 4),
            "wall_median": round(statistics.median(walls), 4),
            "engine_busy_mean": round(statistics.fmean(busy), 4),
            "overhead_mean": round(statistics.fmean(overhead), 4),
            "overhead_median": round(statistics.median(overhead), 4),
            "overhead_last_shard": round(overhead[-1], 4),
        },
        "total_seconds": round(elapsed, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200, help="shards in the job")
    parser.add_argument("--rows-per-shard", type=int, default=4)
    parser.add_argument("--words", type=int, default=3, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--model", help="model folder (default: stories260K, else a tiny "
                                        "random Llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.shards < 3:
        parser.error("--shards must be at least 3 (first, middle and last shards)")
    with tempfile.TemporaryDirectory(prefix="shard-overhead-") as scratch:
        print(json.dumps(run(args, Path(scratch)), indent=2))


if __name__ == "__main__":
    main()
