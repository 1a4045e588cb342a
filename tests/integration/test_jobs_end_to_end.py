"""Whole jobs through real servers: Parquet in, shards on Celery (Redis or the embedded
broker), real worker processes running the engine, results and usage in S3 (moto) or files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine import LLM, SamplingParams
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

JOB_TIMEOUT = 300


def prompts_table(rows: int) -> pa.Table:
    """Varied prompts, a pass-through column, per-row overrides, and three invalid rows."""
    words = "the cat dog bird ran saw a big red ball in park once upon time".split()
    prompts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 11)) for i in range(rows)]
    prompts[5] = None
    prompts[17] = ""
    prompts[29] = "the cat " * 400  # longer than the tiny model's 512-token context
    return pa.table({
        "id": [f"r-{i:04d}" for i in range(rows)],
        "prompt": prompts,
        "category": [f"c{i % 4}" for i in range(rows)],
        "max_tokens": [4 + i % 9 if i % 3 == 0 else None for i in range(rows)],
        "temperature": [0.9 if i % 5 == 0 else None for i in range(rows)],
        "seed": [1000 + i if i % 5 == 0 else None for i in range(rows)],
    })


INVALID_IDS = {"r-0005", "r-0017", "r-0029"}


def expected_outputs(model_path, table: pa.Table, default_max_tokens: int) -> dict[str, dict]:
    """What the engine gives directly for the valid rows with their effective parameters."""
    llm = LLM(model=str(model_path), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    rows = [r for r in table.to_pylist() if r["id"] not in INVALID_IDS]
    params = [SamplingParams(max_tokens=r["max_tokens"] or default_max_tokens,
                             temperature=r["temperature"] if r["temperature"] is not None else 0.0,
                             seed=r["seed"]) for r in rows]
    outs = llm.generate([r["prompt"] for r in rows], params)
    return {r["id"]: {"output": o.text, "completion_tokens": o.completion_tokens,
                      "prompt_tokens": o.prompt_tokens, "finish_reason": o.finish_reason}
            for r, o in zip(rows, outs, strict=True)}


def check_job(client: Client, job_id: str, table: pa.Table, model_path, max_tokens: int) -> None:
    job = client.job(job_id)
    status = job.status()
    assert status["state"] == "completed", status
    rows = table.num_rows
    assert status["counts"]["total_rows"] == rows
    assert status["counts"]["succeeded_rows"] == rows - len(INVALID_IDS)
    assert status["counts"]["failed_rows"] == len(INVALID_IDS)

    results = job.results()
    ids = results.column("id").to_pylist()
    assert Counter(ids).most_common(1)[0][1] == 1, "a row appears twice"
    assert set(ids) == {f"r-{i:04d}" for i in range(rows)} - INVALID_IDS
    assert ids == sorted(ids), "results are in input order"
    by_id = {r["id"]: r for r in results.to_pylist()}
    assert all(by_id[i]["category"] == f"c{int(i[2:]) % 4}" for i in by_id), "pass-through column"

    expected = expected_outputs(model_path, table, max_tokens)
    for row_id, want in expected.items():
        got = by_id[row_id]
        assert (got["output"], got["completion_tokens"], got["prompt_tokens"], got["finish_reason"]) == (
            want["output"], want["completion_tokens"], want["prompt_tokens"], want["finish_reason"]), row_id
    # Per-row max_tokens overrides applied (greedy random models rarely stop early).
    assert by_id["r-0003"]["completion_tokens"] <= 4 + 3 % 9

    errors = pa.concat_tables([pq.read_table(client.store.open_read(k))
                               for k in client.store.list(f"jobs/{job_id}/errors/")])
    assert set(errors.column("id").to_pylist()) == INVALID_IDS
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("error").to_pylist(), strict=True))
    assert "empty" in reasons["r-0017"].lower() or "null" in reasons["r-0017"].lower()
    assert "context" in reasons["r-0029"].lower() or "long" in reasons["r-0029"].lower()

    usage_keys = [k for k in client.store.list("usage/") if job_id in k]
    usage = pa.concat_tables([pq.read_table(client.store.open_read(k)) for k in usage_keys])
    assert usage.num_rows == status["counts"]["shards_total"]
    assert pc.sum(usage.column("completion_tokens")).as_py() == pc.sum(results.column("completion_tokens")).as_py()
    assert pc.sum(usage.column("prompt_tokens")).as_py() == pc.sum(results.column("prompt_tokens")).as_py()
    assert pc.sum(usage.column("rows")).as_py() == rows
    assert all(w.startswith("w") for w in usage.column("worker").to_pylist())
    assert status["usage"]["completion_tokens"] == pc.sum(results.column("completion_tokens")).as_py()


def test_job_over_s3_and_redis_with_two_workers(tmp_path, redis_server, s3_store_url, tiny_llama):
    table = prompts_table(240)
    path = tmp_path / "prompts.parquet"
    pq.write_table(table, path, row_group_size=60)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    job = client.submit(path, model=str(tiny_llama), max_tokens=6, shard_size=40, id_column="id")

    env = worker_env(redis_server.url, s3_store_url)
    with running_workers(2, env, tmp_path):
        job.wait(timeout=JOB_TIMEOUT)
    check_job(client, job.id, table, tiny_llama, max_tokens=6)


def test_job_on_embedded_defaults(tmp_path, tiny_llama, monkeypatch):
    """No Redis, no S3: the filesystem broker and the file:// store under BATCHINFER_HOME."""
    monkeypatch.setenv("BATCHINFER_HOME", str(tmp_path / "home"))
    table = prompts_table(60)
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=25)
    client = Client()
    assert client.store_url.startswith("file://")
    job = client.submit(tmp_path / "prompts.parquet", model=str(tiny_llama), max_tokens=5,
                        shard_size=25, id_column="id")
    env = worker_env("", client.store_url, BATCHINFER_HOME=str(tmp_path / "home"))
    env.pop("BATCHINFER_BROKER_URL")
    env.pop("BATCHINFER_STORE_URL")
    with running_workers(1, env, tmp_path):
        job.wait(timeout=JOB_TIMEOUT)
    check_job(client, job.id, table, tiny_llama, max_tokens=5)


def test_job_with_a_model_registered_on_s3(tmp_path, redis_server, s3_server, s3_store_url,
                                           tiny_llama):
    """BATCHINFER_MODELS names a model by an s3:// URI: the worker downloads it into its
    model cache and the job's outputs are those of the same model loaded from a folder."""
    prefix = f"{s3_store_url.removeprefix(f's3://{s3_server.bucket}/')}/models/tiny"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for path in tiny_llama.iterdir():
        s3.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.name}")
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"tiny": f"s3://{s3_server.bucket}/{prefix}"}))
    table = prompts_table(60)
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=30)
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    job = client.submit(tmp_path / "prompts.parquet", model="tiny", max_tokens=5, shard_size=30,
                        id_column="id")
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_MODELS=str(registry),
                     BATCHINFER_MODEL_CACHE=str(tmp_path / "model-cache"))
    with running_workers(1, env, tmp_path) as [worker]:
        job.wait(timeout=JOB_TIMEOUT)
    check_job(client, job.id, table, tiny_llama, max_tokens=5)
    # The operator sees the download in the worker's log, once for the two shards.
    assert worker.log_path.read_text().count(f"fetching s3://{s3_server.bucket}/{prefix}") == 1
    [cached] = (tmp_path / "model-cache").glob("*-tiny")
    assert (cached / "model.safetensors").read_bytes() == (
        tiny_llama / "model.safetensors").read_bytes()


def test_unknown_model_fails_the_job_with_the_reason(tmp_path, redis_server, s3_store_url):
    pq.write_table(pa.table({"prompt": ["hello", "world"]}), tmp_path / "p.parquet")
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    job = client.submit(tmp_path / "p.parquet", model=str(tmp_path / "no-such-model"))
    with running_workers(1, worker_env(redis_server.url, s3_store_url), tmp_path):
        status = job.wait(timeout=JOB_TIMEOUT)
    assert status["state"] == "failed"
    assert "no-such-model" in status["reason"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("case", ["not-parquet", "missing-column", "wrong-type", "duplicate-ids",
                                  "empty-file", "no-such-file"])
def test_cli_rejects_bad_input_with_one_line_and_exit_2(case, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("BATCHINFER_HOME", str(tmp_path / "home"))
    path = tmp_path / "input.parquet"
    extra = []
    if case == "not-parquet":
        path.write_text("id,prompt\n1,hello\n")
    elif case == "missing-column":
        pq.write_table(pa.table({"text": ["hello"]}), path)
    elif case == "wrong-type":
        pq.write_table(pa.table({"prompt": [1, 2, 3]}), path)
    elif case == "duplicate-ids":
        pq.write_table(pa.table({"id": [1, 1], "prompt": ["a", "b"]}), path)
        extra = ["--id-column", "id"]
    elif case == "empty-file":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    result = run_cli("submit", str(path), "--model", str(tiny_llama), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchinfer: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "jobs").exists() or not any((tmp_path / "home" / "jobs").iterdir()), \
        "nothing is uploaded for an invalid input"


def test_cli_help_and_version():
    assert run_cli("--version").stdout.startswith("batchinfer ")
    for command in ("submit", "status", "jobs", "results", "cancel", "worker", "demo"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: batchinfer" in result.stdout, command


def test_cli_submit_json_status_and_jobs(tmp_path, tiny_llama, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("BATCHINFER_HOME", str(home))
    pq.write_table(pa.table({"prompt": ["the cat", "a dog"]}), tmp_path / "p.parquet")
    submitted = run_cli("submit", str(tmp_path / "p.parquet"), "--model", str(tiny_llama), "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    status = json.loads(run_cli("status", job_id, "--json").stdout)
    assert status["job_id"] == job_id and status["state"] == "queued"
    assert status["counts"]["total_rows"] == 2
    listed = json.loads(run_cli("jobs", "--json").stdout)
    assert [j["job_id"] for j in listed] == [job_id] and listed[0]["state"] == "queued"
    bad = run_cli("status", "../../etc")
    assert bad.returncode == 2 and bad.stderr.startswith("batchinfer: error: ")
