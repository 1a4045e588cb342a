"""Two shards at once through one engine (engine/shared.py), as a worker of two threads
runs them: the same parts, byte for byte, as one shard after the other on an engine of
their own, and usage that counts the engine's time once."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from engine import LLM
from engine.shared import SharedLLM
from jobs import keys, runner
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from jobs.tables import read_table

# No prefix caching: a row's cached_tokens would depend on which rows happened to be in
# the cache when it was admitted, which differs between the two ways of running (its
# output does not).
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory="64MiB",
                      enable_prefix_caching=False)
WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()
ROWS, SHARD_ROWS = 40, 20


def skewed_rows() -> pa.Table:
    """Greedy rows of skewed lengths: most short, a few long ones (a shard's tail)."""
    return pa.table({
        "id": [f"r{i:03d}" for i in range(ROWS)],
        "prompt": [" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(2 + i % 13))
                   for i in range(ROWS)],
        "max_tokens": [80 if i % 10 == 9 else 3 + i % 5 for i in range(ROWS)],
    })


def submit(store_url: str, tmp_path, name: str) -> tuple[str, list]:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(skewed_rows(), path, row_group_size=SHARD_ROWS)
    return create_job(open_store(store_url), path,
                      JobSpec(model="tiny", id_column="id", shard_size=SHARD_ROWS))


def parts(store_url: str, job_id: str, shards: list) -> list[bytes]:
    store = open_store(store_url)
    return [store.get_bytes(keys.result_key(job_id, s.index)) for s in shards]


def test_two_shards_at_once_write_what_one_after_the_other_write(tmp_path, tiny_llama):
    alone_url, shared_url = f"file://{tmp_path / 'alone'}", f"file://{tmp_path / 'shared'}"
    alone_job, shards = submit(alone_url, tmp_path, "alone")
    assert len(shards) == 2
    llm = LLM(model=str(tiny_llama), **ENGINE_OPTIONS)
    for shard in shards:
        runner.run_shard(open_store(alone_url), alone_job, shard.index, llm)

    shared_job, _ = submit(shared_url, tmp_path, "shared")
    shared = SharedLLM(LLM(model=str(tiny_llama), **ENGINE_OPTIONS))
    summaries: dict[int, runner.ShardSummary] = {}
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            summaries[index] = runner.run_shard(open_store(shared_url), shared_job, index,
                                                shared.client())
        except BaseException as failure:  # noqa: BLE001 - reported by the main thread
            failures.append(failure)

    threads = [threading.Thread(target=run, args=(s.index,)) for s in shards]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    wall = time.monotonic() - started
    assert not failures, failures
    assert all(summaries[s.index].succeeded == SHARD_ROWS for s in shards)

    assert parts(shared_url, shared_job, shards) == parts(alone_url, alone_job, shards)
    store = open_store(shared_url)
    usage = pa.concat_tables([read_table(store, k) for k in store.list("usage/")
                              if shared_job in k])
    busy = usage.column("busy_seconds").to_pylist()
    assert len(busy) == 2
    assert all(b > 0 for b in busy)
    # Each shard counts its share of the engine's steps, so the two never exceed the time
    # the engine ran (the shards' wall times overlap: counted each, they would).
    assert sum(busy) <= wall + 0.05


def test_a_cancelled_shard_leaves_the_other_running(tmp_path, tiny_llama, monkeypatch):
    """Cancel is per shard: the cancelled one's requests are aborted in the shared engine,
    the other's run on and are written whole."""
    monkeypatch.setattr(runner, "CANCEL_CHECK_SECONDS", 0.0)
    url = f"file://{tmp_path / 'store'}"
    job_id, shards = submit(url, tmp_path, "in")
    shared = SharedLLM(LLM(model=str(tiny_llama), **ENGINE_OPTIONS))
    cancelled_shard = 0
    checks = []
    summaries: dict[int, runner.ShardSummary] = {}

    def cancel_on_third_check() -> bool:
        checks.append(1)
        return len(checks) == 3

    def run(index: int) -> None:
        summaries[index] = runner.run_shard(
            open_store(url), job_id, index, shared.client(),
            should_cancel=cancel_on_third_check if index == cancelled_shard else None)

    threads = [threading.Thread(target=run, args=(s.index,)) for s in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    other = 1 - cancelled_shard
    assert summaries[cancelled_shard].cancelled
    assert summaries[other].succeeded == SHARD_ROWS
    store = open_store(url)
    assert not store.exists(keys.result_key(job_id, cancelled_shard))
    assert store.exists(keys.result_key(job_id, other))
    assert not shared.llm.has_unfinished_requests()
