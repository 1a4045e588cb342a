"""The daily usage rollup and job expiry on the moto S3 server, and their CLI commands."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import expiry, keys, manifest, rollup
from jobs.errors import UserError
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from jobs.usage import BatchFigures, make_usage_record, write_usage
from workers import cli

DAY = date(2026, 3, 14)


def record(job_id: str, shard: int, model: str, day: date, *, rows: int, prompt: int,
           completion: int, busy: float, hourly: float = 3.0):
    finished = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=12)
    return make_usage_record(
        job_id=job_id, shard=shard, model=model, quantization=None, worker="gpu0@host",
        device="cuda:0", rows=rows, prompt_tokens=prompt, completion_tokens=completion,
        cached_tokens=prompt // 2, started_at=finished - timedelta(seconds=busy),
        finished_at=finished, busy_seconds=busy, batch=BatchFigures(0.8, 200.0),
        hourly_usd=hourly)


def test_rollup_sums_each_models_usage_and_reruns_identically(s3_store_url):
    store = open_store(s3_store_url)
    job_a, job_b, job_c = keys.new_job_id(), keys.new_job_id(), keys.new_job_id()
    records = [
        record(job_a, 0, "llama-8b", DAY, rows=100, prompt=5000, completion=2000, busy=1800),
        record(job_a, 1, "llama-8b", DAY, rows=50, prompt=2500, completion=1000, busy=900),
        record(job_b, 0, "llama-8b", DAY, rows=10, prompt=400, completion=300, busy=60),
        record(job_c, 0, "qwen-7b-gptq", DAY, rows=20, prompt=800, completion=900, busy=120,
               hourly=1.0),
        # Other days are not this day's business.
        record(job_c, 1, "qwen-7b-gptq", DAY + timedelta(days=1), rows=5, prompt=1,
               completion=1, busy=1),
        record(job_a, 2, "llama-8b", DAY - timedelta(days=1), rows=5, prompt=1, completion=1,
               busy=1),
    ]
    for r in records:
        write_usage(store, r)

    result = rollup.rollup_usage(store, DAY)
    key = "usage/daily/date=2026-03-14/summary.parquet"
    assert result == {"key": key, "records": 4, "models": 2}
    summary = {row["model"]: row for row in pq.read_table(store.open_read(key)).to_pylist()}
    assert sorted(summary) == ["llama-8b", "qwen-7b-gptq"]

    llama = summary["llama-8b"]
    assert (llama["date"], llama["jobs"], llama["shards"], llama["rows"]) == (DAY, 2, 3, 160)
    assert (llama["prompt_tokens"], llama["completion_tokens"], llama["cached_tokens"]) == (
        7900, 3300, 2500 + 1250 + 200)
    assert llama["busy_hours"] == pytest.approx((1800 + 900 + 60) / 3600)
    assert llama["cost_usd"] == pytest.approx((1800 + 900 + 60) / 3600 * 3.0)
    assert llama["cost_per_million_tokens"] == pytest.approx(llama["cost_usd"] / 11200 * 1e6)
    # The sums agree with the records the usage writer wrote.
    day_records = [r for r in records if r.finished_at.date() == DAY]
    assert llama["cost_usd"] + summary["qwen-7b-gptq"]["cost_usd"] == pytest.approx(
        sum(r.cost_usd for r in day_records))
    qwen = summary["qwen-7b-gptq"]
    assert (qwen["jobs"], qwen["rows"], qwen["cost_usd"]) == (1, 20, pytest.approx(120 / 3600))

    first = store.get_bytes(key)
    rollup.rollup_usage(store, DAY)
    assert store.get_bytes(key) == first


def test_a_day_without_usage_gets_an_empty_summary(s3_store_url):
    store = open_store(s3_store_url)
    assert rollup.rollup_usage(store, DAY)["models"] == 0
    table = pq.read_table(store.open_read(rollup.summary_key(DAY)))
    assert table.num_rows == 0 and table.schema == rollup.SUMMARY_SCHEMA


def make_job(store, state: str, *, created_days_ago: float, finished_days_ago: float | None):
    job_id, _ = create_job(store, pa.table({"prompt": ["a", "b"]}), JobSpec(model="m"))
    now = datetime.now(UTC)
    job = manifest.load_manifest(store, job_id)
    job.update(state=state, created_at=(now - timedelta(days=created_days_ago)).isoformat(),
               finished_at=None if finished_days_ago is None
               else (now - timedelta(days=finished_days_ago)).isoformat())
    manifest.save_manifest(store, job_id, job)
    store.put_bytes(keys.result_key(job_id, 0), b"part")
    return job_id


def test_expiry_deletes_only_finished_jobs_past_the_retention(s3_store_url):
    store = open_store(s3_store_url)
    old_done = make_job(store, "completed", created_days_ago=45, finished_days_ago=40)
    old_failed = make_job(store, "failed", created_days_ago=50, finished_days_ago=None)
    # Finished recently, though created long ago: the end counts.
    recent = make_job(store, "completed", created_days_ago=45, finished_days_ago=3)
    kept = [make_job(store, state, created_days_ago=90, finished_days_ago=None)
            for state in ("running", "queued", "validating", "finalizing", "cancelling")]

    expired = expiry.expire_jobs(store, retention_days=30)
    assert sorted(expired) == sorted([old_done, old_failed])
    for job_id in expired:
        assert store.list(keys.job_prefix(job_id)) == []
    for job_id in [recent, *kept]:
        assert keys.manifest_key(job_id) in store.list(keys.job_prefix(job_id))
        assert keys.result_key(job_id, 0) in store.list(keys.job_prefix(job_id))
    # Nothing left to do on a rerun.
    assert expiry.expire_jobs(store, retention_days=30) == []


def test_expiry_refuses_a_retention_under_one_day(s3_store_url):
    with pytest.raises(UserError, match="at least 1 day"):
        expiry.expire_jobs(open_store(s3_store_url), retention_days=0)


def test_nightly_cli_commands(s3_store_url, monkeypatch, capsys):
    monkeypatch.setenv("BATCHINFER_STORE_URL", s3_store_url)
    store = open_store(s3_store_url)
    write_usage(store, record(keys.new_job_id(), 0, "m", DAY, rows=1, prompt=2, completion=3,
                              busy=4))
    assert cli.main(["nightly", "rollup-usage", "--date", DAY.isoformat()]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 1

    old = make_job(store, "completed", created_days_ago=9, finished_days_ago=8)
    monkeypatch.setenv("BATCHINFER_RETENTION_DAYS", "7")
    assert cli.main(["nightly", "expire-jobs"]) == 0
    assert json.loads(capsys.readouterr().out) == {"expired": [old]}

    assert cli.main(["nightly", "expire-jobs", "--retention-days", "0"]) == 2
    assert "at least 1 day" in capsys.readouterr().err
    assert cli.main(["nightly", "rollup-usage", "--date", "14/03/2026"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
