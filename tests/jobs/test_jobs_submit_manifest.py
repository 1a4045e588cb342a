"""Creating jobs, the manifest and its state machine, and live progress."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import keys, manifest
from jobs.errors import UserError
from jobs.progress import add_live_counts, eta_seconds, read_progress, write_progress
from jobs.spec import JobSpec, load_spec
from jobs.store import get_json, open_store
from jobs.submit import create_job
from workers.client import Client


@pytest.fixture(params=["file", "s3"])
def store(request):
    return open_store(request.getfixturevalue(f"{request.param}_store_url"))


def test_create_job_uploads_input_spec_and_a_queued_manifest(store, tmp_path):
    table = pa.table({"prompt": [f"p{i}" for i in range(25)], "id": list(range(25))})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=10)
    spec = JobSpec(model="tiny", id_column="id", max_tokens=9, shard_size=10)

    job_id, shards = create_job(store, path, spec)

    assert keys.validate_job_id(job_id) == job_id
    assert [(s.row_start, s.row_end) for s in shards] == [(0, 10), (10, 20), (20, 25)]
    assert store.list(keys.job_prefix(job_id)) == sorted(
        [keys.input_key(job_id), keys.spec_key(job_id), keys.manifest_key(job_id)])
    assert store.get_bytes(keys.input_key(job_id)) == path.read_bytes()
    assert load_spec(store, job_id) == spec
    saved = get_json(store, keys.manifest_key(job_id))
    assert saved["job_id"] == job_id and saved["state"] == "queued" and saved["model"] == "tiny"
    assert saved["counts"] == {"total_rows": 25, "succeeded_rows": 0, "failed_rows": 0,
                               "shards_total": 3, "shards_done": 0}
    assert set(saved["usage"]) == set(manifest.USAGE_FIELDS)
    assert saved["created_at"].endswith("+00:00")
    assert saved["started_at"] is None and saved["finished_at"] is None


def test_create_job_from_a_table(file_store_url):
    store = open_store(file_store_url)
    job_id, shards = create_job(store, pa.table({"prompt": ["a", "b"]}), JobSpec(model="m"))
    assert len(shards) == 1
    assert pq.read_table(store.open_read(keys.input_key(job_id))).num_rows == 2


def test_an_invalid_input_uploads_nothing(store, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(UserError, match="no column 'prompt'"):
        create_job(store, path, JobSpec(model="m"))
    assert store.list("") == []


def test_manifest_never_holds_secrets(file_store_url, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    store = open_store(file_store_url)
    job_id, _ = create_job(store, pa.table({"prompt": ["a"]}), JobSpec(model="m"))
    text = store.get_bytes(keys.manifest_key(job_id)).decode()
    assert "very-secret-value" not in text and store.url not in text
    assert set(json.loads(text)) == {"job_id", "state", "model", "counts", "usage", "created_at",
                                     "started_at", "finished_at", "reason"}


def new_job(store) -> str:
    job_id, _ = create_job(store, pa.table({"prompt": ["a", "b"]}), JobSpec(model="m"))
    return job_id


def test_update_merges_counts_and_checks_state_changes(file_store_url):
    store = open_store(file_store_url)
    job_id = new_job(store)
    updated = manifest.update_manifest(store, job_id, counts={"succeeded_rows": 2})
    assert updated["counts"]["total_rows"] == 2 and updated["counts"]["succeeded_rows"] == 2
    assert manifest.load_manifest(store, job_id) == updated
    with pytest.raises(UserError, match="is queued; it cannot become completed"):
        manifest.update_manifest(store, job_id, state="completed")
    with pytest.raises(ValueError, match="unknown job state"):
        manifest.save_manifest(store, job_id, {**updated, "state": "exploded"})
    for state in ("running", "finalizing", "completed", "queued"):  # ... and a retry
        assert manifest.update_manifest(store, job_id, state=state)["state"] == state


def test_running_cancel_and_listing(file_store_url):
    store = open_store(file_store_url)
    first = new_job(store)
    time.sleep(0.01)
    second = new_job(store)

    running = manifest.mark_running(store, first)
    assert running["state"] == "running" and running["started_at"]
    assert manifest.mark_running(store, first) == running  # only the first shard stamps it

    assert not manifest.cancel_requested(store, second)
    assert manifest.request_cancel(store, second)["state"] == "cancelling"
    assert manifest.cancel_requested(store, second)
    assert manifest.mark_running(store, second)["state"] == "cancelling"
    manifest.update_manifest(store, second, state="cancelled")
    assert manifest.request_cancel(store, second)["state"] == "cancelled"

    store.put_bytes("jobs/not-a-job/manifest.json", b"{}")  # ignored: not a job id
    store.put_bytes(f"jobs/{keys.new_job_id()}/spec.json", b"{}")  # still being created
    listed = manifest.list_manifests(store)
    assert [m["job_id"] for m in listed] == [second, first]


def test_unknown_job_is_a_user_error(file_store_url):
    store = open_store(file_store_url)
    with pytest.raises(UserError, match="not found"):
        manifest.load_manifest(store, keys.new_job_id())
    with pytest.raises(UserError, match="invalid job id"):
        manifest.load_manifest(store, "../../etc")


def test_progress_adds_up_running_shards(store):
    job_id = keys.new_job_id()
    assert read_progress(store, job_id)["rows_done"] == 0
    write_progress(store, job_id, 0, 10, 10, 500, 100.0, 0.5)  # finished
    write_progress(store, job_id, 1, 4, 10, 120, 30.0, 0.4)
    write_progress(store, job_id, 2, 6, 8, 200, 20.0, 0.6)
    progress = read_progress(store, job_id)
    assert (progress["rows_done"], progress["rows_total"]) == (20, 28)
    assert progress["tokens"] == 820
    assert (progress["shards_reporting"], progress["shards_running"]) == (3, 2)
    assert progress["tokens_per_second"] == 50.0
    assert progress["occupancy"] == pytest.approx(0.5)
    assert [s["shard"] for s in progress["shards"]] == [0, 1, 2]


def test_a_running_job_counts_rows_of_its_whole_input_and_shards_as_they_finish(store, tmp_path):
    """Job.status() of a running job: rows done out of every row of the input (not only of
    the shards that reported), shards done as their parts land, failed rows, an ETA."""
    job_id, _ = create_job(store, pa.table({"prompt": [f"p{i}" for i in range(40)]}),
                           JobSpec(model="m", shard_size=10))
    manifest.mark_running(store, job_id)
    write_progress(store, job_id, 0, 10, 10, 500, 100.0, 0.5, failed=2)
    write_progress(store, job_id, 1, 4, 10, 120, 30.0, 0.4, failed=1)
    store.put_bytes(keys.result_key(job_id, 0), b"")  # shard 0's part has landed
    status = Client(store_url=store.url).job(job_id).status()
    assert status["state"] == "running"
    assert status["counts"] == {"total_rows": 40, "succeeded_rows": 11, "failed_rows": 3,
                                "shards_total": 4, "shards_done": 1}
    assert status["progress"]["eta_seconds"] is not None and status["progress"]["eta_seconds"] >= 0

    started = datetime(2026, 1, 1, tzinfo=UTC)
    assert eta_seconds(14, 40, started.isoformat(), started + timedelta(seconds=7)) == 13.0
    assert eta_seconds(0, 40, started.isoformat()) is None
    # A retry round's progress covers only the rows it runs again: the counts stay.
    retried = {"job_id": job_id, "retry": {"round": 1},
               "counts": {"total_rows": 40, "succeeded_rows": 37, "failed_rows": 3}}
    add_live_counts(store, retried, read_progress(store, job_id))
    assert retried["counts"] == {"total_rows": 40, "succeeded_rows": 37, "failed_rows": 3,
                                 "shards_done": 1}
