"""Create a job: validate the input, then upload it with the spec and a queued manifest."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import keys
from jobs.manifest import new_manifest, save_manifest
from jobs.planner import Shard, plan_shards
from jobs.spec import JobSpec, save_spec, validate_input
from jobs.store import Store


def create_job(store: Store, source: str | Path | pa.Table,
               spec: JobSpec) -> tuple[str, list[Shard]]:
    """Validate source against spec and store a new queued job; returns its id and shards.

    Nothing is uploaded unless the input is valid. The manifest is written last, so a job
    that has one is complete in the store.
    """
    with tempfile.TemporaryDirectory(prefix="batchinfer-submit-") as scratch:
        if isinstance(source, pa.Table):
            path = Path(scratch) / "input.parquet"
            pq.write_table(source, path)
        else:
            path = Path(source)
        info = validate_input(path, spec)
        shards = plan_shards(info.metadata, spec.shard_size)
        job_id = keys.new_job_id()
        store.upload_file(path, keys.input_key(job_id))
    save_spec(store, job_id, spec)
    save_manifest(store, job_id, new_manifest(job_id, spec.model, info.num_rows, len(shards)))
    return job_id, shards
