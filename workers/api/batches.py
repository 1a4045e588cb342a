"""A batch's life: validated and made a job when created, then its status, counts, usage
and files read from the job's manifest whenever it is looked at.

Statuses from the job's states:

| job state                        | batch status                                   |
|----------------------------------|------------------------------------------------|
| (the input file is invalid)      | `failed`, with `errors`                        |
| validating                       | `validating` (`cancelling` once cancelled)     |
| queued, running                  | `in_progress` (`cancelling` once cancelled)    |
| finalizing                       | `finalizing`                                   |
| cancelling                       | `cancelling` (`finalizing` when it expired)    |
| completed                        | `completed`                                    |
| failed                           | `failed`                                       |
| cancelled                        | `cancelled`, or `expired` past its window      |

A batch whose window ends before its job does is cancelled; its finished requests are
kept and the others go to the error file with code `batch_expired`. A final status is
shown only once the output and error files are written, so a client that sees it can
read them at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs import finalize, models, progress
from jobs.errors import UserError
from jobs.manifest import TERMINAL_STATES, JobState, load_manifest, request_cancel
from jobs.openai_requests import BatchFileInvalid, parse_batch_file
from jobs.openai_responses import ResponseRenderer, unfinished_code, write_lines
from jobs.settings import env_number, mask_secrets
from jobs.store import NotFound, Store, get_json, json_bytes
from workers.api import objects
from workers.client import Client

FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
WINDOW = re.compile(r"([1-9][0-9]*)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA_PAIRS = 16
# A batch validating this long has lost its server (validation runs within the request).
STALE_VALIDATION_SECONDS = 3600
# Where active batches are listed, so the server can expire those nobody looks at.
ACTIVE_PREFIX = f"{objects.PREFIX}active/"
CANCELLED_BY = "the OpenAI API (batches.cancel)"
# What a client is told when the server's BATCHINFER_MODELS cannot be read: the detail
# (the file's path) is the server's business, and goes to its log.
REGISTRY_UNREADABLE = "the server's model registry could not be read; tell its operator"

log = logging.getLogger(__name__)


def api_shard_size() -> int:
    """Requests per shard of a batch (BATCHINFER_API_SHARD_SIZE, default 1000): a batch
    that expires or is cancelled keeps its finished shards, so smaller shards keep more."""
    return int(env_number("BATCHINFER_API_SHARD_SIZE", 1000, positive=True))


def window_seconds(window: str) -> int:
    """"24h" (OpenAI's only window), or any count of s, m, h or d; ValueError if not."""
    match = WINDOW.fullmatch(window) if isinstance(window, str) else None
    if match is None:
        raise ValueError(f"completion_window must be like 24h (a count of s, m, h or d), "
                         f"got {window!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in metadata.items())):
        raise ValueError("metadata must be at most 16 string pairs (keys up to 64 "
                         "characters, values up to 512)")
    return metadata


def create_batch(client: Client, owner: str, input_file: dict[str, Any], endpoint: str,
                 window: str, metadata: dict[str, str] | None) -> dict[str, Any]:
    """A new batch over input_file (owner's); its job is queued, or the batch is failed
    with the reasons its file cannot run."""
    store = client.store
    created = objects.now()
    record: dict[str, Any] = {
        "id": objects.new_batch_id(), "object": "batch", "endpoint": endpoint,
        "errors": None, "input_file_id": input_file["id"], "completion_window": window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": created, "in_progress_at": None,
        "expires_at": created + window_seconds(window), "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
        "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata, "model": None, "usage": None, "owner": owner,
    }
    objects.save_new(store, "batches", record)
    try:
        requests = parse_batch_file(store.get_bytes(objects.content_key(input_file["id"])),
                                    endpoint)
        record["model"] = requests.model
        if errors := _model_errors(requests.model):
            raise BatchFileInvalid(errors)
        job = client.submit(requests.table, **requests.job_settings(),
                            shard_size=api_shard_size())
    except BatchFileInvalid as invalid:
        return _settle(store, _fail_fields(record, invalid.errors))
    except UserError as error:
        return _settle(store, _fail_fields(record, [{
            "code": "invalid_request", "message": str(error), "param": None, "line": None}]))
    record.update(_job_id=job.id, status="in_progress", in_progress_at=objects.now(),
                  request_counts={"total": requests.table.num_rows, "completed": 0,
                                  "failed": 0})
    record = _settle(store, record)
    store.put_bytes(ACTIVE_PREFIX + record["id"], b"")
    if record["cancelling_at"]:  # cancelled while it was validating: its job stops at once
        job.cancel(by=CANCELLED_BY)
        record["status"] = "cancelling"
    return record


def _model_errors(model: str) -> list[dict[str, Any]]:
    """Why model cannot run on this server: none when it is one of its models."""
    try:
        if models.is_registered(model):
            return []
    except UserError as error:  # the server's registry is broken, not the client's file
        log.error("cannot check a batch's model: %s", mask_secrets(str(error)))
        return [{"code": "model_registry_unavailable", "line": None, "param": None,
                 "message": REGISTRY_UNREADABLE}]
    return [{"code": "model_not_found", "line": 1, "param": "body.model",
             "message": f"model {model!r} is not one of this server's models "
                        f"(BATCHINFER_MODELS)"}]


def _settle(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """Save what validating a batch made of it, keeping a cancel that came in meanwhile
    (cancel_batch stamps cancelling_at: the one field another request changes then)."""
    def change(stored: bytes | None) -> bytes:
        cancelled = json.loads(stored).get("cancelling_at") if stored else None
        return json_bytes({**record, "cancelling_at": cancelled or record["cancelling_at"]})

    return json.loads(store.update(objects.batch_key(record["id"]), change))


def _fail_fields(record: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    record.update(status="failed", failed_at=objects.now(),
                  errors={"object": "list", "data": errors})
    return record


def _fail(store: Store, record: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    objects.save(store, _fail_fields(record, errors))
    return record


def cancel_batch(client: Client, record: dict[str, Any]) -> dict[str, Any]:
    """Stop a batch's job (requests already done stay); a batch that has ended is left.
    A batch still validating has no job yet: it is marked, and create_batch, or this, if
    the job appeared in between, cancels the job."""
    store = client.store
    record = refresh(store, record)
    if record["status"] in FINAL_STATUSES or record["status"] == "cancelling":
        return record

    def stamp(stored: bytes | None) -> bytes:
        current = json.loads(stored) if stored else dict(record)
        if current["status"] not in FINAL_STATUSES:  # not failed validation meanwhile
            current["cancelling_at"] = current["cancelling_at"] or objects.now()
            if current.get("_job_id") is None:
                current["status"] = "cancelling"
        return json_bytes(current)

    record = json.loads(store.update(objects.batch_key(record["id"]), stamp))
    if record["status"] in FINAL_STATUSES or record.get("_job_id") is None:
        return record
    client.job(record["_job_id"]).cancel(by=CANCELLED_BY)
    return refresh(store, record)


def refresh(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """The batch as its job stands now (expiring it when its window has ended); a batch
    that ended is saved with its files and not read again."""
    if record["status"] in FINAL_STATUSES:
        return record
    job_id = record.get("_job_id")
    if job_id is None:  # its creation never finished: the server stopped in between
        if objects.now() - record["created_at"] > STALE_VALIDATION_SECONDS:
            return _fail(store, record, [{"code": "validation_interrupted", "param": None,
                                          "line": None, "message": "the server stopped "
                                          "while validating this batch; create it again"}])
        return record
    manifest = load_manifest(store, job_id)
    if (manifest["state"] not in TERMINAL_STATES and not record.get("_expiring")
            and objects.now() >= record["expires_at"]):
        record["_expiring"] = True
        objects.save(store, record)
        request_cancel(store, job_id, by="the end of its completion window")
        manifest = finalize.finalize_if_complete(store, job_id) or load_manifest(store, job_id)
    manifest = progress.with_live_progress(store, manifest)
    state = manifest["state"]
    record["usage"] = _usage(manifest.get("usage", {}))
    counts = manifest["counts"]
    record["request_counts"] = {"total": counts["total_rows"],
                                "completed": counts.get("succeeded_rows", 0),
                                "failed": counts.get("failed_rows", 0)}
    if state in TERMINAL_STATES:
        return _finish(store, record, manifest)
    if state == JobState.FINALIZING or record.get("_expiring"):
        status, stamp = "finalizing", "finalizing_at"
    elif record["cancelling_at"] or state == JobState.CANCELLING:
        status, stamp = "cancelling", "cancelling_at"
    else:
        status = "validating" if state == JobState.VALIDATING else "in_progress"
        stamp = None
    record["status"] = status
    if stamp and not record[stamp]:  # the first time it is seen: kept
        record[stamp] = objects.now()
        objects.save(store, record)
    return record


def _finish(store: Store, record: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    state, expired = manifest["state"], bool(record.get("_expiring"))
    if state == JobState.CANCELLED:
        status = "expired" if expired else "cancelled"
    else:
        status = "completed" if state == JobState.COMPLETED else "failed"
    unfinished = unfinished_code(state, expired)
    record["finalizing_at"] = record["finalizing_at"] or objects.now()
    renderer = ResponseRenderer(store, record["_job_id"], model=record["model"])
    record["output_file_id"], completed = _write_file(store, record, "output",
                                                      renderer.output_lines())
    record["error_file_id"], _ = _write_file(store, record, "error",
                                             renderer.error_lines(unfinished))
    # The counts of the files (a shard still finishing as the job was cancelled may have
    # landed after the manifest counted): whatever did not complete, failed.
    counts = record["request_counts"]
    counts.update(completed=completed, failed=counts["total"] - completed)
    if status == "failed":
        record["errors"] = {"object": "list", "data": [
            {"code": "batch_failed", "message": manifest.get("reason") or "the job failed",
             "param": None, "line": None}]}
    record["status"] = status
    record[f"{status}_at"] = objects.now()
    objects.save(store, record)
    store.delete(ACTIVE_PREFIX + record["id"])
    return record


def _write_file(store: Store, batch: dict[str, Any], kind: str,
                lines: Iterable[bytes]) -> tuple[str | None, int]:
    """Store a batch's output or error file; its id (None when it has no lines) and its
    line count. The id comes from the batch's, so a batch finished twice (two servers at
    once) writes one file."""
    digest = hashlib.sha256(f"{batch['id']}:{kind}".encode()).hexdigest()
    file_id = f"file-{digest[:32]}"
    with tempfile.TemporaryDirectory(prefix="batchinfer-api-") as scratch:
        path = Path(scratch) / "lines.jsonl"
        count = write_lines(lines, path)
        if not count:
            return None, 0
        if store.exists(objects.file_key(file_id)):
            return file_id, count
        size = path.stat().st_size
        store.upload_file(path, objects.content_key(file_id))
    objects.save_new(store, "files", {
        "id": file_id, "object": "file", "bytes": size, "created_at": objects.now(),
        "filename": f"{batch['id']}_{kind}.jsonl", "purpose": "batch_output",
        "status": "processed", "expires_at": None, "status_details": None,
        "owner": batch["owner"]})
    return file_id, count


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": 0}}


def expire_overdue(store: Store) -> None:
    """Look at every active batch once, which expires those past their window."""
    for key in store.list(ACTIVE_PREFIX):
        try:
            record = get_json(store, objects.batch_key(key.removeprefix(ACTIVE_PREFIX)))
        except NotFound:
            store.delete(key)
            continue
        refresh(store, record)
