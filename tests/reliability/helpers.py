"""Helpers of the fault-injection tests: prompt tables, waiting, the exactly-once check,
the Redis transport's unacknowledged deliveries, and the command line."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from workers.client import Client

WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()


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
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def cli_json(*args: str, env: dict | None = None) -> dict:
    done = run_cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
