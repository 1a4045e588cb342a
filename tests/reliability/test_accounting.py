"""The bookkeeping behind "nothing lost, nothing twice", on real stores with part files
written by hand to set up each case: retry attempts, their counting and merging, retry
rounds and finalizing, cancel markers, and which failures count as transient."""

from __future__ import annotations

import botocore.exceptions
import pyarrow as pa
import pytest
import redis
import torch

from jobs import keys, manifest
from jobs.errors import UserError
from jobs.faults import is_out_of_memory, is_transient
from jobs.file_store import FileStore
from jobs.finalize import finalize_if_complete, finalize_job, record_shard_failure
from jobs.outcomes import count_failed, list_outcomes, merge_errors, transient_ids
from jobs.results import merge_results
from jobs.retry import plan_retry, start_retry
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from jobs.tables import put_table


@pytest.fixture(params=["file", "s3"])
def store(request):
    return open_store(request.getfixturevalue(f"{request.param}_store_url"))


def two_shard_job(store) -> str:
    job_id, shards = create_job(store, pa.table({"prompt": [f"p{i}" for i in range(8)]}),
                                JobSpec(model="m", shard_size=4))
    assert len(shards) == 2
    return job_id


def results(store, job_id, shard, rows, attempt=0) -> None:
    put_table(store, keys.result_key(job_id, shard, attempt), pa.table({
        "row_index": pa.array(rows, pa.int64()), "output": [f"o{r}" for r in rows]}))


def errors(store, job_id, shard, rows: dict[int, str], attempt=0) -> None:
    put_table(store, keys.error_key(job_id, shard, attempt), pa.table({
        "row_index": pa.array(list(rows), pa.int64()),
        "error": ["why"] * len(rows), "error_kind": list(rows.values())}))


def test_attempt_keys_round_trip():
    job_id = keys.new_job_id()
    assert keys.result_key(job_id, 3, 12).endswith("/results/part-00003-r012.parquet")
    assert keys.failure_key(job_id, 3, 1).endswith("/failures/shard-00003-r001.json")
    for key in (keys.result_key(job_id, 3, 12), keys.error_key(job_id, 3, 12),
                keys.usage_key(manifest.datetime.now().date(), job_id, 3, 12)):
        assert keys.part_of_key(key) == (3, 12)
    assert keys.part_of_key(keys.result_key(job_id, 3)) == (3, 0)
    with pytest.raises(ValueError):
        keys.result_key(job_id, 3, keys.MAX_ATTEMPTS)


def test_a_retried_row_counts_once_in_its_latest_state(store):
    job_id = two_shard_job(store)
    errors(store, job_id, 0, {1: "invalid", 2: "transient", 3: "transient"})
    results(store, job_id, 0, [0])
    results(store, job_id, 1, [4, 5, 6, 7])
    [outcome] = [list_outcomes(store, job_id)[0]]
    assert transient_ids(store, outcome) == [2, 3]
    assert count_failed(store, outcome) == 3

    # Round 1 reran rows 2 and 3: 3 succeeded, 2 failed again (transient).
    errors(store, job_id, 0, {2: "transient"}, attempt=1)
    results(store, job_id, 0, [3], attempt=1)
    # A crashed round 2 left only its errors part: not counted.
    errors(store, job_id, 0, {2: "invalid"}, attempt=2)
    outcome = list_outcomes(store, job_id)[0]
    assert sorted(outcome.results) == [0, 1] and sorted(outcome.errors) == [0, 1]
    assert transient_ids(store, outcome) == [2]
    assert transient_ids(store, outcome, before=1) == [2, 3]
    assert count_failed(store, outcome) == 2
    assert sorted(merge_errors(store, job_id).column("row_index").to_pylist()) == [1, 2]
    merged = merge_results(store, job_id)
    assert merged.column("row_index").to_pylist() == [0, 3, 4, 5, 6, 7]  # input order

    final = finalize_job(store, job_id)
    assert final["counts"]["succeeded_rows"] == 6 and final["counts"]["failed_rows"] == 2


def test_a_retry_round_runs_whole_failed_shards_and_transient_rows(store):
    job_id = two_shard_job(store)
    errors(store, job_id, 0, {1: "invalid", 2: "transient"})
    results(store, job_id, 0, [0, 3])
    record_shard_failure(store, job_id, 1, "model not there yet")
    assert finalize_if_complete(store, job_id)["state"] == "failed"

    plan = plan_retry(store, job_id)
    assert (plan.round, plan.whole_shards, plan.row_shards) == (1, [1], {0: 1})
    queued = []
    summary = start_retry(store, job_id, lambda shard, attempt: queued.append((shard, attempt)))
    assert queued == [(1, 0), (0, 1)] and summary["round"] == 1
    status = manifest.load_manifest(store, job_id)
    assert status["state"] == "queued" and status["reason"] is None
    assert status["retry"] == {"round": 1, "row_shards": [0]}
    assert not store.exists(keys.failure_key(job_id, 1))
    with pytest.raises(UserError, match="is queued; retry it once it has finished"):
        start_retry(store, job_id, lambda *a: None)

    results(store, job_id, 1, [4, 5, 6, 7])  # the whole shard ran
    assert finalize_if_complete(store, job_id) is None  # shard 0's round-1 rows still out
    results(store, job_id, 0, [2], attempt=1)
    final = finalize_if_complete(store, job_id)
    assert final["state"] == "completed"
    assert final["counts"]["succeeded_rows"] == 7 and final["counts"]["failed_rows"] == 1
    assert start_retry(store, job_id, lambda *a: None)["round"] is None  # invalid rows stay


def test_a_failed_retry_round_fails_the_job_with_its_reason(store):
    job_id = two_shard_job(store)
    errors(store, job_id, 0, {0: "transient"})
    results(store, job_id, 0, [1, 2, 3])
    results(store, job_id, 1, [4, 5, 6, 7])
    assert finalize_if_complete(store, job_id)["state"] == "completed"
    start_retry(store, job_id, lambda *a: None)
    record_shard_failure(store, job_id, 0, "the model is gone", attempt=1)
    final = finalize_if_complete(store, job_id)
    assert final["state"] == "failed"
    assert "retry round 1 of shard 0: the model is gone" in final["reason"]
    assert final["counts"]["failed_rows"] == 1  # the row is still failed, not lost


def test_two_retries_racing_start_one_round(store):
    job_id = two_shard_job(store)
    record_shard_failure(store, job_id, 0, "x")
    record_shard_failure(store, job_id, 1, "x")
    finalize_if_complete(store, job_id)
    store.create_once(keys.retry_round_key(job_id, 1), b'{"at": "' +
                      manifest.utc_now().encode() + b'"}')  # the other retry, just now
    with pytest.raises(UserError, match="has already been started"):
        start_retry(store, job_id, lambda *a: None)


def test_a_cancel_is_a_marker_no_manifest_write_loses(file_store_url):
    store = open_store(file_store_url)
    job_id = two_shard_job(store)
    stale = manifest.load_manifest(store, job_id)  # a shard read it before the cancel...
    manifest.request_cancel(store, job_id)
    manifest.save_manifest(store, job_id, stale)  # ...and wrote it after
    assert manifest.cancel_requested(store, job_id)
    assert manifest.mark_running(store, job_id)["state"] == "queued"
    assert finalize_if_complete(store, job_id)["state"] == "cancelled"
    # A retry runs the cancelled job's shards: the cancel no longer stands.
    queued = []
    start_retry(store, job_id, lambda shard, attempt: queued.append(shard))
    assert queued == [0, 1] and not manifest.cancel_requested(store, job_id)


def test_a_finalizer_counts_a_part_written_while_it_counted(tmp_path):
    class PartDuringFinalize(FileStore):
        """A real folder store where a late shard finishes between the finalizer's count and
        its write of the final manifest."""

        late = None

        def put_bytes(self, key, data):
            if self.late and key.endswith("manifest.json") and b'"cancelled"' in data:
                late, self.late = self.late, None
                late()
            super().put_bytes(key, data)

    store = PartDuringFinalize(tmp_path)
    job_id = two_shard_job(store)
    results(store, job_id, 0, [0, 1, 2, 3])
    manifest.request_cancel(store, job_id)
    store.late = lambda: results(store, job_id, 1, [4, 5, 6, 7])
    final = finalize_job(store, job_id)
    assert final["state"] == "cancelled"
    assert final["counts"]["succeeded_rows"] == 8 and final["counts"]["shards_done"] == 2


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_transient_and_out_of_memory_failures():
    transient = [
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
        _client_error("SlowDown", 503), _client_error("InternalError", 500),
        redis.ConnectionError("gone"), ConnectionResetError(),
    ]
    permanent = [_client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404),
                 UserError("unknown model"), ValueError("bad"), FileNotFoundError("x")]
    assert all(is_transient(e) for e in transient)
    assert not any(is_transient(e) for e in permanent)
    try:
        try:
            raise redis.ConnectionError("gone")
        except redis.ConnectionError as error:
            raise RuntimeError("while renewing") from error
    except RuntimeError as chained:
        assert is_transient(chained)

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                       "can't allocate memory: you tried to allocate 262471680 bytes.")
    assert is_out_of_memory(cpu) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
