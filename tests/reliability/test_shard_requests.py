"""A shard's fixed cost in S3 requests does not grow with its job: the real shard task
(`workers.tasks.run_shard`, applied in this process) over the moto S3 server, every
request counted as botocore makes it. Only the last shard lists the job's parts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jobs.manifest import load_manifest
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from tests.reliability.helpers import prompts_table, write_input

ROWS_PER_SHARD = 2


def run_job(store_url: str, model: str, shards: int, scratch: Path
            ) -> tuple[list[Counter], dict]:
    """Run a job of `shards` shards one by one through the shard task: each shard's S3
    requests by operation, and the final manifest."""
    from workers.tasks import run_shard

    store = open_store(store_url)
    source = write_input(scratch, prompts_table(shards * ROWS_PER_SHARD, words=2),
                         name=f"{shards}.parquet", row_group_size=ROWS_PER_SHARD)
    job_id, planned = create_job(store, source, JobSpec(
        model=model, id_column="id", max_tokens=1, shard_size=ROWS_PER_SHARD))
    assert len(planned) == shards
    counts: list[Counter] = []

    def count(model, **_) -> None:
        counts[-1][model.name] += 1

    # The S3 client is shared by every store of the process, the tasks' included.
    store.client.meta.events.register("provide-client-params.s3.*", count)
    try:
        for index in range(shards):
            counts.append(Counter())
            summary = run_shard.apply(args=(job_id, index, shards, store_url)).get()
            assert summary["succeeded"] == ROWS_PER_SHARD, summary
    finally:
        store.client.meta.events.unregister("provide-client-params.s3.*", count)
    return counts, load_manifest(store, job_id)


def test_a_shard_makes_as_many_requests_in_a_job_four_times_larger(
        s3_store_url, tiny_llama, tmp_path):
    small, small_job = run_job(f"{s3_store_url}/small", str(tiny_llama), 4, tmp_path)
    large, large_job = run_job(f"{s3_store_url}/large", str(tiny_llama), 16, tmp_path)
    for job, shards in ((small_job, 4), (large_job, 16)):
        assert job["state"] == "completed"
        assert job["counts"]["succeeded_rows"] == shards * ROWS_PER_SHARD
        assert job["counts"]["shards_done"] == shards

    # Shards between the first (which marks the job running) and the last (which lists
    # the parts and finalizes) all make the very same requests, however large the job.
    middle = {tuple(sorted(c.items())) for c in small[1:-1] + large[1:-1]}
    assert len(middle) == 1, middle
    requests = Counter(dict(middle.pop()))
    # One write per object (no temporary copies), no listing, no deletes of what is absent.
    assert not {"ListObjectsV2", "CopyObject", "DeleteObject"} & set(requests), requests
    assert sum(requests.values()) <= 11, requests
    assert large[-1]["ListObjectsV2"] > 0  # the last shard counted every part
