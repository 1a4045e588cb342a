"""A GPTQ model through batch jobs: the shard runner in-process, and a real worker process.

Results must equal what the engine gives directly, and the usage records must name the
quantization (and carry the engine's weight bytes).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from engine import SamplingParams
from jobs import runner
from jobs.keys import new_job_id
from jobs.results import merge_results
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from jobs.tables import read_table
from jobs.usage import BatchFigures, job_usage_parts, make_usage_record, write_usage
from tests.quant.engine_helpers import make_llm
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()
MAX_TOKENS = 6


def prompts_table(rows: int) -> pa.Table:
    prompts = [" ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(1 + i % 9))
               for i in range(rows)]
    return pa.table({"id": [f"r{i:03d}" for i in range(rows)], "prompt": prompts})


def expected_outputs(llm, table: pa.Table) -> dict[str, tuple]:
    outs = llm.generate(table.column("prompt").to_pylist(),
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return {i: (o.text, o.completion_tokens) for i, o in
            zip(table.column("id").to_pylist(), outs, strict=True)}


def check_weight_bytes(records: list[dict], expected: int) -> None:
    """Every record carries the engine's packed weight bytes (int4: ~1/8 of float32)."""
    assert {r["weight_bytes"] for r in records} == {expected}


def test_gptq_shards_through_the_runner(gptq_int4_model, file_store_url, tmp_path):
    store = open_store(file_store_url)
    table = prompts_table(12)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=4)
    job_id, shards = create_job(store, tmp_path / "in.parquet",
                                JobSpec(model="gptq-tiny", id_column="id",
                                        max_tokens=MAX_TOKENS, shard_size=4))
    llm = make_llm(gptq_int4_model, enable_prefix_caching=True)
    for shard in shards:
        summary = runner.run_shard(store, job_id, shard.index, llm, worker="w1")
        assert summary.succeeded == 4 and summary.failed == 0

    results = merge_results(store, job_id)
    got = {r["id"]: (r["output"], r["completion_tokens"]) for r in results.to_pylist()}
    assert got == expected_outputs(make_llm(gptq_int4_model), table)

    records = [row for key in store.list("usage/") if job_id in key
               for row in read_table(store, key).to_pylist()]
    assert len(records) == len(shards)
    assert {r["quantization"] for r in records} == {"gptq-int4-g64"}
    assert {r["model"] for r in records} == {"gptq-tiny"}
    check_weight_bytes(records, llm.stats()["weight_bytes"])


def test_usage_record_keeps_weight_bytes(file_store_url):
    store = open_store(file_store_url)
    now = datetime.now(UTC)
    job_id = new_job_id()
    fields = dict(job_id=job_id, shard=0, model="m", quantization="int8", worker="w",
                  device="cpu", rows=1, prompt_tokens=3, completion_tokens=4, cached_tokens=0,
                  started_at=now, finished_at=now, busy_seconds=1.0, batch=BatchFigures(0.5, 7.0),
                  hourly_usd=0.0)
    write_usage(store, make_usage_record(**fields, weight_bytes=123456))
    day = now.date()
    [record] = job_usage_parts(store, job_id, day, day).values()
    assert record.weight_bytes == 123456 and record.quantization == "int8"
    assert make_usage_record(**fields).weight_bytes is None  # callers that do not know it


def test_gptq_job_on_a_worker_process(gptq_int4_model, tmp_path, monkeypatch):
    """Client + a real Celery worker on the embedded broker and file store."""
    home = tmp_path / "home"
    monkeypatch.setenv("BATCHINFER_HOME", str(home))
    table = prompts_table(24)
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=8)
    client = Client()
    job = client.submit(tmp_path / "prompts.parquet", model=str(gptq_int4_model),
                        max_tokens=MAX_TOKENS, shard_size=8, id_column="id")
    env = worker_env("", client.store_url, BATCHINFER_HOME=str(home))
    env.pop("BATCHINFER_BROKER_URL")
    env.pop("BATCHINFER_STORE_URL")
    with running_workers(1, env, tmp_path):
        status = job.wait(timeout=240)
    assert status["state"] == "completed", status
    assert status["counts"]["succeeded_rows"] == 24

    results = job.results()
    got = {r["id"]: (r["output"], r["completion_tokens"]) for r in results.to_pylist()}
    llm = make_llm(gptq_int4_model)  # float32, as worker_env sets BATCHINFER_DTYPE
    assert got == expected_outputs(llm, table)

    records = [row for key in client.store.list("usage/") if job.id in key
               for row in pq.read_table(client.store.open_read(key)).to_pylist()]
    assert len(records) == status["counts"]["shards_total"] == 3
    assert {r["quantization"] for r in records} == {"gptq-int4-g64"}
    assert {r["device"] for r in records} == {"cpu"}
    check_weight_bytes(records, llm.stats()["weight_bytes"])
