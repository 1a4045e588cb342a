"""Finalizing a job from what its shards left, merging results, and usage records.

The shard outputs here are written by hand to set up each case exactly; the real runner
writes them in test_jobs_runner.py.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import keys, manifest, rollup
from jobs.errors import UserError
from jobs.finalize import (
    finalize_after_shard,
    finalize_if_complete,
    finalize_job,
    record_shard_failure,
)
from jobs.results import merge_results, write_results_file
from jobs.retry import start_retry
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from jobs.tables import put_table, read_table
from jobs.usage import (
    BatchFigures,
    UsageRecord,
    job_usage_parts,
    make_usage_record,
    usage_totals,
    write_usage,
)

NOW = datetime.now(UTC)


def usage_records(store, job_id: str, first_day, last_day) -> list:
    """The job's usage records in (shard, attempt) order."""
    parts = job_usage_parts(store, job_id, first_day, last_day)
    return [parts[part] for part in sorted(parts)]


@pytest.fixture
def store(file_store_url):
    return open_store(file_store_url)


def three_shard_job(store) -> str:
    table = pa.table({"prompt": [f"p{i}" for i in range(9)]})
    job_id, shards = create_job(store, table, JobSpec(model="m", shard_size=3))
    assert len(shards) == 3
    return job_id


def record(job_id: str, shard: int, *, finished: datetime = NOW, busy: float = 2.0,
           prompt: int = 30, completion: int = 10, occupancy: float = 0.5) -> UsageRecord:
    return make_usage_record(
        job_id=job_id, shard=shard, model="m", quantization=None, worker="w", device="cpu",
        rows=3, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=4,
        started_at=finished - timedelta(seconds=busy), finished_at=finished, busy_seconds=busy,
        batch=BatchFigures(occupancy, 40 * occupancy), hourly_usd=1.8)


def finish_shard(store, job_id: str, shard: int, succeeded: int, failed: int = 0,
                 **usage) -> None:
    """What run_shard leaves: errors part, usage record, then the results part."""
    first = shard * 3
    if failed:
        put_table(store, keys.error_key(job_id, shard),
                  pa.table({"row_index": list(range(first, first + failed)),
                            "error": ["prompt is empty"] * failed}))
    write_usage(store, record(job_id, shard, **usage))
    start = first + failed
    put_table(store, keys.result_key(job_id, shard),
              pa.table({"row_index": pa.array(range(start, start + succeeded), pa.int64()),
                        "output": pa.array([f"o{i}" for i in range(start, start + succeeded)],
                                           pa.string())}))


def test_usage_record_derived_fields():
    r = record(keys.new_job_id(), 0, busy=2.0, prompt=30, completion=10)
    assert r.tokens_per_second == 20.0
    assert r.cost_usd == pytest.approx(2.0 / 3600 * 1.8)
    assert r.cost_per_million_tokens == pytest.approx(r.cost_usd / 40 * 1e6)
    idle = record(keys.new_job_id(), 0, busy=0.0, prompt=0, completion=0)
    assert (idle.tokens_per_second, idle.cost_usd, idle.cost_per_million_tokens) == (0, 0, 0)
    before = {"steps": 10, "scheduled_tokens": 100, "scheduled_seqs": 30, "max_num_seqs": 8}
    after = {"steps": 14, "scheduled_tokens": 200, "scheduled_seqs": 46, "max_num_seqs": 8}
    assert BatchFigures.between(before, after) == BatchFigures(0.5, 25.0)
    assert BatchFigures.between(after, after) == BatchFigures(0.0, 0.0)


def test_usage_totals_weight_batch_figures_by_busy_time():
    job_id = keys.new_job_id()
    totals = usage_totals([record(job_id, 0, busy=1.0, occupancy=0.2),
                           record(job_id, 1, busy=3.0, occupancy=0.6)])
    assert totals["prompt_tokens"] == 60 and totals["completion_tokens"] == 20
    assert totals["cached_tokens"] == 8 and totals["busy_seconds"] == 4.0
    assert totals["tokens_per_second"] == 20.0
    assert totals["occupancy"] == pytest.approx(0.5)
    assert totals["mean_tokens_per_step"] == pytest.approx(20.0)
    assert totals["cost_per_million_tokens"] == pytest.approx(totals["cost_usd"] / 80 * 1e6)
    assert usage_totals([])["tokens_per_second"] == 0.0


def test_usage_is_filed_by_day_and_a_later_retry_wins(store):
    job_id = keys.new_job_id()
    yesterday = NOW - timedelta(days=1)
    key = write_usage(store, record(job_id, 0, finished=yesterday, completion=1))
    assert key == keys.usage_key(yesterday.date(), job_id, 0)
    write_usage(store, record(job_id, 0, finished=NOW, completion=2))
    write_usage(store, record(job_id, 1, finished=yesterday, completion=3))
    records = usage_records(store, job_id, yesterday.date(), NOW.date())
    assert [(r.shard, r.completion_tokens) for r in records] == [(0, 2), (1, 3)]
    assert usage_records(store, job_id, NOW.date(), NOW.date())[0].completion_tokens == 2


def test_a_rerun_on_a_later_day_replaces_the_earlier_days_record(store):
    """A shard whose first run died after writing usage, run again two days later: one
    record is left, the later, and the earlier day's rollup, made before, no longer counts
    it, so the days' summaries together count the shard once."""
    job_id = keys.new_job_id()
    first_day = NOW - timedelta(days=2)
    write_usage(store, record(job_id, 0, finished=first_day, completion=1))
    write_usage(store, record(job_id, 1, finished=first_day, completion=3))
    rollup.rollup_usage(store, first_day.date())
    write_usage(store, record(job_id, 0, finished=NOW, completion=2),
                earlier_runs_since=first_day.date())
    rollup.rollup_usage(store, NOW.date())
    records = usage_records(store, job_id, first_day.date(), NOW.date())
    assert [(r.shard, r.completion_tokens, r.finished_at) for r in records] == [
        (0, 2, NOW), (1, 3, first_day)]
    summaries = [read_table(store, rollup.summary_key(day)).to_pylist()
                 for day in (first_day.date(), NOW.date())]
    assert [(row["shards"], row["completion_tokens"]) for rows in summaries
            for row in rows] == [(1, 3), (1, 2)]


def test_finalize_counts_rows_and_sums_usage(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    finish_shard(store, job_id, 1, succeeded=1, failed=2)
    finish_shard(store, job_id, 2, succeeded=3, busy=4.0)
    final = finalize_job(store, job_id)
    assert final["state"] == "completed" and final["reason"] is None
    assert final["counts"] == {"total_rows": 9, "succeeded_rows": 7, "failed_rows": 2,
                               "shards_total": 3, "shards_done": 3}
    assert final["usage"]["prompt_tokens"] == 90 and final["usage"]["busy_seconds"] == 8.0
    assert final["usage"]["cost_usd"] == pytest.approx(8.0 / 3600 * 1.8)
    assert final["finished_at"] and final["started_at"]
    assert manifest.load_manifest(store, job_id) == final


def test_missing_shards_fail_the_job_with_the_reason(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    # Shard 1 died after writing its errors and usage but before its results.
    put_table(store, keys.error_key(job_id, 1), pa.table({"row_index": [3], "error": ["x"]}))
    write_usage(store, record(job_id, 1))
    final = finalize_job(store, job_id)
    assert final["state"] == "failed"
    assert final["reason"] == "2 of 3 shards produced no results (shards 1, 2)"
    assert final["counts"]["succeeded_rows"] == 3 and final["counts"]["failed_rows"] == 0
    assert final["usage"]["prompt_tokens"] == 30


def test_the_last_shard_to_finish_finalizes(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    assert finalize_if_complete(store, job_id) is None
    finish_shard(store, job_id, 2, succeeded=3)
    assert finalize_if_complete(store, job_id) is None
    assert manifest.load_manifest(store, job_id)["state"] == "queued"
    finish_shard(store, job_id, 1, succeeded=2, failed=1)
    final = finalize_if_complete(store, job_id)
    assert final["state"] == "completed" and final["counts"]["succeeded_rows"] == 8
    assert finalize_if_complete(store, job_id) == final  # a second "last" shard changes nothing


def test_a_shard_that_could_not_run_fails_the_job_with_its_reason(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    record_shard_failure(store, job_id, 1,
                         "UserError: unknown model 'x'; redis://:hunter2@host:6379 refused")
    assert finalize_if_complete(store, job_id) is None  # shard 2 is still out
    record_shard_failure(store, job_id, 2, "UserError: unknown model 'x'")
    final = finalize_if_complete(store, job_id)
    assert final["state"] == "failed"
    assert final["reason"].startswith("2 shard(s) failed; first: UserError: unknown model 'x'")
    assert "hunter2" not in final["reason"]
    assert "hunter2" not in store.get_bytes(keys.failure_key(job_id, 1)).decode()
    assert final["counts"]["shards_done"] == 1


def test_a_retried_shard_outweighs_its_recorded_failure(store):
    job_id = three_shard_job(store)
    record_shard_failure(store, job_id, 1, "worker lost its GPU")
    for shard in range(3):
        finish_shard(store, job_id, shard, succeeded=3)
    assert finalize_if_complete(store, job_id)["state"] == "completed"


def test_a_cancelled_job_finalizes_as_cancelled(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    manifest.request_cancel(store, job_id)
    final = finalize_if_complete(store, job_id)  # at once: the other shards will not run
    assert final["state"] == "cancelled" and final["counts"]["succeeded_rows"] == 3
    finish_shard(store, job_id, 1, succeeded=3)  # one that was already past its last check
    assert finalize_if_complete(store, job_id)["counts"]["succeeded_rows"] == 6
    assert manifest.load_manifest(store, job_id)["state"] == "cancelled"


@pytest.fixture(params=["file", "s3"])
def any_store(request):
    return open_store(request.getfixturevalue(f"{request.param}_store_url"))


def test_a_shard_finalizes_when_it_completes_the_shards_done_count(any_store):
    store = any_store
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    assert finalize_after_shard(store, job_id, 0) is None
    finish_shard(store, job_id, 2, succeeded=3)
    assert finalize_after_shard(store, job_id, 2) is None
    assert finalize_after_shard(store, job_id, 2) is None  # a duplicate counts once
    assert manifest.load_manifest(store, job_id)["state"] == "queued"
    finish_shard(store, job_id, 1, succeeded=2, failed=1)
    final = finalize_after_shard(store, job_id, 1)
    assert final["state"] == "completed"
    assert final["counts"]["succeeded_rows"] == 8 and final["counts"]["failed_rows"] == 1
    assert finalize_after_shard(store, job_id, 0) == final  # redelivered after the end


def test_a_shard_that_died_before_counting_itself_counts_when_delivered_again(any_store):
    store = any_store
    job_id = three_shard_job(store)
    for shard in range(3):
        finish_shard(store, job_id, shard, succeeded=3)
    assert finalize_after_shard(store, job_id, 0) is None
    assert finalize_after_shard(store, job_id, 2) is None  # shard 1's task died after its part
    assert manifest.load_manifest(store, job_id)["state"] == "queued"
    assert finalize_after_shard(store, job_id, 1)["state"] == "completed"  # its redelivery


def test_recorded_failures_count_as_done_shards(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    assert finalize_after_shard(store, job_id, 0) is None
    for shard in (1, 2):
        record_shard_failure(store, job_id, shard, "model not there")
    assert finalize_after_shard(store, job_id, 1) is None
    final = finalize_after_shard(store, job_id, 2)
    assert final["state"] == "failed" and final["reason"].startswith("2 shard(s) failed")


def test_a_cancel_finalizes_after_any_shard(store):
    job_id = three_shard_job(store)
    finish_shard(store, job_id, 0, succeeded=3)
    started = manifest.load_manifest(store, job_id)  # what the shard read as it started
    manifest.request_cancel(store, job_id)
    final = finalize_after_shard(store, job_id, 0, manifest=started)
    assert final["state"] == "cancelled" and final["counts"]["succeeded_rows"] == 3


def test_a_retry_round_finalizes_by_listing(store):
    job_id = three_shard_job(store)
    record_shard_failure(store, job_id, 1, "model not there")
    for shard in (0, 2):
        finish_shard(store, job_id, shard, succeeded=3)
    assert finalize_if_complete(store, job_id)["state"] == "failed"
    start_retry(store, job_id, lambda shard, attempt: None)
    finish_shard(store, job_id, 1, succeeded=3)
    # The first run's shards-done count never saw shard 1 done: the round counts parts.
    final = finalize_after_shard(store, job_id, 1)
    assert final["state"] == "completed" and final["counts"]["succeeded_rows"] == 9


def test_finalizing_again_keeps_the_final_state(store):
    job_id = three_shard_job(store)
    for shard in range(3):
        finish_shard(store, job_id, shard, succeeded=3)
    first = finalize_job(store, job_id)
    record_shard_failure(store, job_id, 1, "a late duplicate that failed")
    again = finalize_job(store, job_id)
    assert again == first


def test_merge_and_write_results_in_input_order(store, tmp_path):
    job_id = three_shard_job(store)
    for shard in (2, 0, 1):  # finished out of order
        finish_shard(store, job_id, shard, succeeded=3 if shard != 1 else 0,
                     failed=0 if shard != 1 else 3)
    merged = merge_results(store, job_id)
    assert merged.column("row_index").to_pylist() == [0, 1, 2, 6, 7, 8]
    out = tmp_path / "out" / "results.parquet"
    out.parent.mkdir()
    assert write_results_file(store, job_id, out) == 6
    assert pq.read_table(out).equals(merged)
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.parquet"]


def test_results_of_a_job_without_any_are_a_user_error(store, tmp_path):
    job_id = three_shard_job(store)
    with pytest.raises(UserError, match="has no results yet"):
        merge_results(store, job_id)
    with pytest.raises(UserError, match="has no results yet"):
        write_results_file(store, job_id, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_usage_records_of_older_workers_read_without_batch_figures(store):
    """Records written before occupancy existed carry mean_batch_fill: they still read, and
    the job's figures come from the records that measured them."""
    job_id = three_shard_job(store)
    old = {name: value for name, value in dataclasses.asdict(record(job_id, 0)).items()
           if name not in ("occupancy", "mean_tokens_per_step")}
    put_table(store, keys.usage_key(NOW.date(), job_id, 0), pa.Table.from_pylist(
        [{**old, "mean_batch_fill": 0.02}]))
    write_usage(store, record(job_id, 1, occupancy=0.9))
    [older, newer] = usage_records(store, job_id, NOW.date(), NOW.date())
    assert (older.occupancy, older.mean_tokens_per_step) == (None, None)
    assert older.prompt_tokens == 30 and newer.occupancy == 0.9
    assert usage_totals([older, newer])["occupancy"] == pytest.approx(0.9)
