"""Create a job: validate the input, then upload it with the spec and a queued manifest.

With an idempotency key, a key already used gives back the job it made instead of a new
one. The key's index object, `idempotency/<sha256 of the key>.json`, is a claim
(jobs/claims.py), so of any number of racing submits exactly one creates the job and
the others return it; the index of a submit that died before creating its job is taken
over once it is stale. A submit whose input turns out invalid removes the index, so the
key can be used again with a corrected file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import keys, models
from jobs.claims import claim
from jobs.errors import ServiceUnavailable, UserError
from jobs.input_file import validate_input
from jobs.manifest import JobState, new_manifest, save_manifest, update_manifest, utc_now
from jobs.planner import Shard, plan_shards
from jobs.spec import JobSpec, load_spec, save_spec, setting_name
from jobs.store import NotFound, Store, get_json, put_json

# A racing submit waits this long for the winner to finish creating the job.
IDEMPOTENCY_WAIT_SECONDS = 60.0
# An index whose job never got a manifest for this long belongs to a submit that died.
STALE_INDEX_SECONDS = 3600.0
# A job whose manifest is this old but whose shards were never marked queued: the submit
# died between the two, so queueing them again is safe (shards run exactly once anyway).
UNQUEUED_SECONDS = 60.0
_POLL_SECONDS = 0.2

# enqueue(job_id, shards): put the job's shards on the broker.
Enqueue = Callable[[str, list[Shard]], None]


def create_job(store: Store, source: str | Path | pa.Table, spec: JobSpec,
               job_id: str | None = None) -> tuple[str, list[Shard]]:
    """Validate source against spec and store a new queued job; returns its id and shards.

    Nothing is uploaded unless the input is valid. The manifest is written last, so a job
    that has one is complete in the store.
    """
    spec = checked_model(spec)
    with tempfile.TemporaryDirectory(prefix="batchinfer-submit-") as scratch:
        if isinstance(source, pa.Table):
            path = Path(scratch) / "input.parquet"
            pq.write_table(source, path)
        else:
            path = Path(source)
        info = validate_input(path, spec)
        shards = plan_shards(info.metadata, spec.shard_size)
        job_id = keys.validate_job_id(job_id) if job_id else keys.new_job_id()
        store.upload_file(path, keys.input_key(job_id))
    save_spec(store, job_id, spec)
    save_manifest(store, job_id, new_manifest(job_id, spec.model, info.num_rows, len(shards)))
    return job_id, shards


def submit_job(store: Store, source: str | Path | pa.Table, spec: JobSpec,
               enqueue: Enqueue) -> tuple[str, bool]:
    """Create the job and queue its shards; (job_id, True if this call created it).

    With spec.idempotency_key, a key already used returns its job (created False).
    """
    if spec.idempotency_key is None:
        job_id, shards = create_job(store, source, spec)
        _enqueue_or_fail(store, job_id, shards, enqueue)
        return job_id, True
    index_key = keys.idempotency_key(spec.idempotency_key)
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_SECONDS

    def died_before_creating(index: dict) -> bool:
        # A job gets its manifest last: without one this long, its submit is gone.
        return not index.get("queued") and _read(store, keys.manifest_key(index["job_id"])) is None

    while True:
        index_claim = claim(store, index_key, {"job_id": keys.new_job_id(), "queued": False},
                            STALE_INDEX_SECONDS, abandoned=died_before_creating)
        index = index_claim.record
        job_id = index["job_id"]
        if index_claim.won:
            try:
                job_id, shards = create_job(store, source, spec, job_id=job_id)
            except BaseException:
                store.delete(index_key)  # the key is free again for a corrected input
                raise
            try:
                _enqueue_or_fail(store, job_id, shards, enqueue)
            except ServiceUnavailable:
                store.delete(index_key)  # the same submit may run again once it is back
                raise
            put_json(store, index_key, {**index, "queued": True})
            return job_id, True
        if index.get("queued"):
            return job_id, False
        manifest = _read(store, keys.manifest_key(job_id))
        if manifest is not None and _age(manifest["created_at"]) > UNQUEUED_SECONDS:
            _requeue(store, job_id, enqueue)  # its submit died after creating it
            put_json(store, index_key, {**index, "queued": True})
            return job_id, False
        if time.monotonic() > deadline:
            raise UserError(f"a job with this idempotency key is still being created "
                            f"(job {job_id}); try again shortly")
        time.sleep(_POLL_SECONDS)


def checked_model(spec: JobSpec) -> JobSpec:
    """spec with its model as workers will find it (a local folder made absolute), refusing
    at once what would fail every row: chat rows for a model whose tokenizer has no chat
    template (known here when the model is a folder on this machine)."""
    spec = dataclasses.replace(spec, model=models.model_for_submit(spec.model))
    folder = models.local_model_folder(spec.model)
    if spec.messages_column and folder is not None and not models.has_chat_template(folder):
        raise UserError(f"model {spec.model!r} has no chat template, so the "
                        f"{spec.messages_column!r} messages cannot be rendered; give plain "
                        f"prompts ({setting_name('prompt_column')}) or a chat model")
    return spec


def _enqueue_or_fail(store: Store, job_id: str, shards: list[Shard], enqueue: Enqueue) -> None:
    """Queue the shards; a job whose shards could not be queued is failed with the reason,
    not left queued forever."""
    try:
        enqueue(job_id, shards)
    except ServiceUnavailable as error:
        update_manifest(store, job_id, state=JobState.FAILED, finished_at=utc_now(),
                        reason=f"its shards could not be queued: {error}")
        raise


def _read(store: Store, key: str) -> dict | None:
    try:
        return get_json(store, key)
    except NotFound:
        return None


def _age(stamp: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()


def _requeue(store: Store, job_id: str, enqueue: Enqueue) -> None:
    spec = load_spec(store, job_id)
    with store.open_read(keys.input_key(job_id)) as file:
        shards = plan_shards(pq.ParquetFile(file).metadata, spec.shard_size)
    enqueue(job_id, shards)
