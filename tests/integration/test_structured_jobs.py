"""Structured, scored and multi-sample outputs through a whole job: a per-row
response_format column, log-probabilities and three samples per row in the results, over
real Redis, moto S3 and a worker process."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.outcomes import ErrorKind
from jobs.results import errors_table
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

JOB_TIMEOUT = 300
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["cat", "dog"]},
                                            "score": {"type": "integer"}},
          "required": ["label", "score"]}
FORMATS = [
    {"type": "choice", "choice": ["yes", "no", "maybe"]},
    {"type": "regex", "regex": "[0-9]{3}-[a-z]{2}"},
    {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}},
    None,
]


def test_a_job_with_per_row_formats_logprobs_and_samples(tmp_path, redis_server, s3_store_url,
                                                         tiny_llama):
    rows = 16
    formats = [FORMATS[i % len(FORMATS)] for i in range(rows)]
    column = [json.dumps(f) if f else None for f in formats]
    column[7] = json.dumps({"type": "regex", "regex": "(unclosed"})  # an invalid row
    table = pa.table({"id": [f"r{i:02d}" for i in range(rows)],
                      "prompt": [f"the cat number {i}" for i in range(rows)],
                      "response_format": pa.array(column, pa.string())})
    pq.write_table(table, tmp_path / "rows.parquet")
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    job = client.submit(tmp_path / "rows.parquet", model=str(tiny_llama), max_tokens=48,
                        id_column="id", logprobs=2, n=3, temperature=1.0, seed=5)
    with running_workers(1, worker_env(redis_server.url, s3_store_url), tmp_path):
        status = job.wait(timeout=JOB_TIMEOUT)
    assert status["state"] == "completed", status
    assert (status["counts"]["succeeded_rows"], status["counts"]["failed_rows"]) == (15, 1)
    [error] = errors_table(client.store, job.id).to_pylist()
    assert error["id"] == "r07" and error["error_kind"] == ErrorKind.INVALID

    samples = job.results().to_pylist()
    expected_order = [(f"r{i:02d}", k) for i in range(rows) if i != 7 for k in range(3)]
    assert [(row["id"], row["sample_index"]) for row in samples] == expected_order
    assert status["usage"]["completion_tokens"] == sum(r["completion_tokens"] for r in samples)
    assert status["usage"]["prompt_tokens"] == sum(
        r["prompt_tokens"] for r in samples if r["sample_index"] == 0)
    for row in samples:
        fmt = formats[int(row["id"][1:])]
        text = row["output"]
        if row["finish_reason"] == "stop" and fmt is not None:
            if fmt["type"] == "choice":
                assert text in fmt["choice"], text
            elif fmt["type"] == "regex":
                assert re.fullmatch(fmt["regex"], text), text
            else:
                value = json.loads(text)
                assert value["label"] in ("cat", "dog") and isinstance(value["score"], int)
        positions = row["logprobs"]
        assert len(positions) == row["completion_tokens"]
        assert all(len(p["top"]) in (2, 3) and p["logprob"] <= 0 for p in positions)
        assert math.isclose(row["cumulative_logprob"], sum(p["logprob"] for p in positions),
                            rel_tol=1e-4, abs_tol=1e-4)
    constrained = [r for r in samples if formats[int(r["id"][1:])] is not None]
    assert sum(r["finish_reason"] == "stop" for r in constrained) >= len(constrained) // 2
    # Three seeded samples of one prompt are three draws, not one copied.
    assert len({r["output"] for r in samples if r["id"] == "r03"}) > 1


def test_a_bad_job_level_format_is_refused_at_submit(tmp_path, tiny_llama):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
    (tmp_path / "format.json").write_text(json.dumps({"type": "regex", "regex": "(oops"}))
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "submit", str(tmp_path / "p.parquet"),
         "--model", str(tiny_llama), "--response-format", str(tmp_path / "format.json")],
        capture_output=True, text=True, timeout=120,
        env={"BATCHINFER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("batchinfer: error: ") and "regex" in line, line
    assert not (tmp_path / "home" / "jobs").exists()
