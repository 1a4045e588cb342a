"""How close a job through the service comes to the engine alone on the same rows.

Builds ROWS rows of skewed lengths (most short, a tenth long: a shard's tail), then times

- the engine alone: one `LLM.generate` call over every row, in this process;
- a job of the same rows through ONE real worker process over Redis and S3 (moto), from
  the manifest's created_at to its finished_at, once per BATCHINFER_WORKER_SHARDS value
  (default 1 and 2: one shard at a time, then two feeding the worker's one engine).

Each worker is warmed with a small job first, so model loading is not counted. Prints
JSON with each figure and the ratio engine seconds / job seconds (the issue's goal: a
job does at least 0.95 of the engine alone's throughput):

    python scripts/service_bench.py --rows 3000 --shard-size 1000 [--worker-shards 1 2]

The model is ../shared/models/stories260K where present, else a random tiny Llama.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.shard_overhead import WORDS, cpu, model_path  # noqa: E402

# The engine settings both sides run with (the worker reads them from its environment).
ENGINE_ENV = {"BATCHINFER_DTYPE": "float32", "BATCHINFER_KV_CACHE_MEMORY": "128MiB"}
JOB_TIMEOUT_SECONDS = 3600


def skewed_rows(rows: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Prompts of 2..12 words; max_tokens 8..32 for most rows, 128..192 for a tenth."""
    draw = random.Random(seed)
    prompts = [" ".join(draw.choice(WORDS) for _ in range(draw.randint(2, 12)))
               for _ in range(rows)]
    max_tokens = [draw.randint(128, 192) if draw.random() < 0.1 else draw.randint(8, 32)
                  for _ in range(rows)]
    return prompts, max_tokens


def engine_alone(model: str, prompts: list[str], max_tokens: list[int]) -> dict:
    from engine import LLM, SamplingParams
    from workers.engine_cache import options_for

    llm = LLM(model=model, **options_for(model))
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    llm.generate(prompts[:8], params[:8])  # warm-up: first-call costs are not the engine's
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(o.prompt_tokens + o.completion_tokens for o in outputs)
    return {"seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1)}


def job_seconds(manifest: dict) -> float:
    created = datetime.fromisoformat(manifest["created_at"])
    return (datetime.fromisoformat(manifest["finished_at"]) - created).total_seconds()


def through_one_worker(scratch: Path, redis_url: str, store_url: str, model: str,
                       source: Path, shard_size: int, worker_shards: int) -> dict:
    from tests.worker_processes import running_workers, worker_env
    from workers.client import Client

    client = Client(store_url=store_url, broker_url=redis_url)
    queue = f"bench-{worker_shards}"
    env = worker_env(redis_url, store_url, **ENGINE_ENV,
                     BATCHINFER_WORKER_SHARDS=str(worker_shards),
                     OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"])
    with running_workers(1, env, scratch, ["--queues", queue], name=f"s{worker_shards}-"):
        warm = client.submit(source.with_name("warm.parquet"), model=model, max_tokens=4,
                             temperature=0.0, queue=queue)
        if warm.wait(timeout=JOB_TIMEOUT_SECONDS)["state"] != "completed":
            raise RuntimeError(f"warm-up job: {warm.status()}")
        job = client.submit(source, model=model, temperature=0.0, shard_size=shard_size,
                            queue=queue)
        manifest = job.wait(timeout=JOB_TIMEOUT_SECONDS)
    if manifest["state"] != "completed":
        raise RuntimeError(f"job {job.id}: {manifest}")
    return {"worker_shards": worker_shards, "seconds": round(job_seconds(manifest), 3),
            "counts": manifest["counts"]}


def run(args: argparse.Namespace, scratch: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tests.servers import MotoS3Server, RedisServer

    os.environ.update({"BATCHINFER_HOME": str(scratch / "home"), "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "OMP_NUM_THREADS": str(args.threads), **ENGINE_ENV})
    for variable in ("BATCHINFER_BROKER_URL", "BATCHINFER_STORE_URL", "AWS_PROFILE"):
        os.environ.pop(variable, None)
    torch.set_num_threads(args.threads)
    model = model_path(scratch, args.model)
    prompts, max_tokens = skewed_rows(args.rows)
    source = scratch / "rows.parquet"
    pq.write_table(pa.table({"prompt": prompts, "max_tokens": max_tokens}), source,
                   row_group_size=min(args.shard_size, 1000))
    pq.write_table(pa.table({"prompt": prompts[:4]}), scratch / "warm.parquet")

    alone = engine_alone(model, prompts, max_tokens)
    redis, s3 = RedisServer(scratch / "redis"), MotoS3Server(scratch / "moto")
    redis.start()
    os.environ["AWS_ENDPOINT_URL"] = s3.endpoint_url
    s3.start()
    try:
        jobs = [through_one_worker(scratch, redis.url, f"s3://{s3.bucket}/bench", model,
                                   source, args.shard_size, shards)
                for shards in args.worker_shards]
    finally:
        s3.stop()
        redis.stop()
    for job in jobs:
        job["ratio_engine_over_job"] = round(alone["seconds"] / job["seconds"], 3)
    return {"cpu": cpu(), "python": platform.python_version(), "torch_threads": args.threads,
            "model": model, "rows": args.rows, "shard_size": args.shard_size,
            "engine_alone": alone, "jobs": jobs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--worker-shards", type=int, nargs="+", default=[1, 2],
                        help="BATCHINFER_WORKER_SHARDS values to run the job with")
    parser.add_argument("--model", help="model folder (default: stories260K, else a tiny "
                                        "random Llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="service-bench-") as scratch:
        print(json.dumps(run(args, Path(scratch)), indent=2))


if __name__ == "__main__":
    main()
