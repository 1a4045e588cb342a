"""The inbox: every `inbox/NAME.parquet` becomes one job, exactly once per version of the
file, and the finished job is delivered to `outbox/NAME/`.

- Each version (object key + ETag) gets a marker, `inbox/_processed/NAME.<etag>.json`,
  claimed once (jobs/claims.py): of two scans racing for the same file only one wins, and
  the file is submitted once. A new upload (new ETag) is a new job.
- The spec is `inbox/NAME.spec.json` (keys: the submit flags' long names with underscores)
  over the defaults from BATCHINFER_INBOX_<FLAG> variables. Upload the spec first: the
  parquet file's ETag alone names the version, so a spec changed later is not seen.
- A file that cannot become a job (no model, a missing column...) is rejected once: its
  marker and `outbox/NAME/manifest.json` say why. Delete the marker to try again.
- Delivery copies the ended job to `outbox/NAME/`: `results.parquet` (merged, input order)
  and `errors.parquet` where the job has such rows, then `manifest.json` (the job's
  manifest plus the source key and ETag). manifest.json is written last: a pipeline waits
  for it. A later version of NAME replaces the folder. The shard task that finalizes the
  job delivers it (deliver_finished_job), found through `jobs/<id>/inbox.json`, which the
  scan writes beside the job when it submits it; each scan also delivers every submitted
  file whose job has ended, in case that did not happen. Both may try: the marker turns
  `delivered` once, and a delivery running twice writes the same files.
- A scanner that died between claiming a file and recording its job leaves a claim that
  goes stale after STALE_CLAIM_SECONDS; the next scan takes the file over. The job's
  idempotency key, derived from key and ETag, keeps that takeover from creating a second job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jobs import keys, manifest
from jobs.claims import claim
from jobs.errors import UserError
from jobs.manifest import JobState, utc_now
from jobs.outcomes import merge_errors
from jobs.results import write_results_file
from jobs.spec import spec_options
from jobs.store import NotFound, Store, get_json, put_json
from jobs.tables import put_table

log = logging.getLogger(__name__)

INBOX_PREFIX = "inbox/"
MARKERS_PREFIX = "inbox/_processed/"
OUTBOX_PREFIX = "outbox/"
# Long enough for a scanner to download and validate a large file before it records the job.
STALE_CLAIM_SECONDS = 3600

# What an inbox spec may set: the submit options (the job spec's fields) and how to read
# each from a BATCHINFER_INBOX_<NAME> variable; the scan sets the idempotency key itself.
SPEC_FIELDS: dict[str, Callable[[str], Any]] = {
    option.name: option.parse for option in spec_options() if option.name != "idempotency_key"}
# Inbox names become object keys and outbox folders: no "/", no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

# client_submit(local_parquet_path, **spec) -> a job (anything with .id), e.g. Client().submit.
Submit = Callable[..., Any]


def scan_inbox(store: Store, client_submit: Submit,
               environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Submit new inbox files and deliver finished ones; returns the names in each outcome.

    environ (default os.environ) gives the BATCHINFER_INBOX_* spec defaults.
    """
    defaults = inbox_defaults(os.environ if environ is None else environ)
    outcome: dict[str, list[str]] = {"submitted": [], "delivered": [], "rejected": [],
                                     "retry": []}
    for key in store.list(INBOX_PREFIX):
        name = _inbox_name(key)
        if name is None:
            continue
        try:
            etag = store.etag(key)
        except NotFound:  # deleted since the listing
            continue
        marker_key = _marker_key(name, etag)
        marker = _claim(store, marker_key, key, etag)
        if marker is not None and marker["state"] == "claimed":
            marker = _submit(store, client_submit, defaults, name, marker_key, marker)
            outcome["retry" if marker is None else marker["state"]].append(name)
        if marker is not None and marker["state"] == "submitted" and _deliver(
                store, name, marker_key, marker):
            outcome["delivered"].append(name)
    return outcome


def _inbox_name(key: str) -> str | None:
    """NAME for `inbox/NAME.parquet` directly in the inbox, else None."""
    rest = key[len(INBOX_PREFIX):]
    if "/" in rest or not rest.endswith(".parquet"):
        return None
    name = rest.removesuffix(".parquet")
    if not _NAME.fullmatch(name):
        log.warning("inbox file %r skipped: names may use letters, digits, '.', '_', '-'", key)
        return None
    return name


def _marker_key(name: str, etag: str) -> str:
    return f"{MARKERS_PREFIX}{name}.{_safe_etag(etag)}.json"


def _safe_etag(etag: str) -> str:
    """ETags are hex (S3, with -N for multipart uploads) here; anything else is hashed."""
    if re.fullmatch(r"[A-Za-z0-9-]{1,64}", etag):
        return etag
    return hashlib.sha256(etag.encode()).hexdigest()[:32]


def _claim(store: Store, marker_key: str, key: str, etag: str) -> dict[str, Any] | None:
    """This file version's marker: a fresh claim when this scan should submit it, the
    existing marker when one is already there, None when another scan holds the claim."""
    marker = claim(store, marker_key, {"source": key, "etag": etag, "state": "claimed"},
                   STALE_CLAIM_SECONDS, abandoned=lambda held: held["state"] == "claimed")
    if not marker.won and marker.record["state"] == "claimed":
        return None  # another scan is submitting it
    return marker.record


def inbox_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """The spec defaults from BATCHINFER_INBOX_<FLAG> variables (empty ones are unset)."""
    defaults = {}
    for field, parse in SPEC_FIELDS.items():
        variable = f"BATCHINFER_INBOX_{field.upper()}"
        raw = environ.get(variable, "")
        if not raw:
            continue
        try:
            defaults[field] = parse(raw)
        except ValueError:
            raise UserError(f"{variable}: cannot read {raw!r} as {parse.__name__}") from None
    return defaults


def _inbox_spec(store: Store, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    spec_key = f"{INBOX_PREFIX}{name}.spec.json"
    try:
        sidecar = get_json(store, spec_key)
    except NotFound:
        sidecar = {}
    except ValueError as error:  # not JSON, or not UTF-8
        raise UserError(f"{spec_key} is not valid JSON: {error}") from None
    if not isinstance(sidecar, dict):
        raise UserError(f"{spec_key} must be a JSON object of submit options")
    unknown = sorted(set(sidecar) - set(SPEC_FIELDS))
    if unknown:
        raise UserError(f"{spec_key}: unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(SPEC_FIELDS)}")
    spec = {**defaults, **sidecar}
    if not spec.get("model"):
        raise UserError(f"no model for {name}: set it in {spec_key} or BATCHINFER_INBOX_MODEL")
    return spec


def _submit(store: Store, client_submit: Submit, defaults: dict[str, Any], name: str,
            marker_key: str, marker: dict[str, Any]) -> dict[str, Any] | None:
    """Submit a claimed file; returns its updated marker, or None when a later scan should
    try again (the claim is released)."""
    source = marker["source"]
    idempotency_key = "inbox-" + hashlib.sha256(
        f"{source}\n{marker['etag']}".encode()).hexdigest()[:32]
    try:
        spec = _inbox_spec(store, name, defaults)
        with tempfile.TemporaryDirectory(prefix="batchinfer-inbox-") as scratch:
            local = Path(scratch) / "input.parquet"
            store.download_file(source, local)
            job = client_submit(local, idempotency_key=idempotency_key, **spec)
    except UserError as error:
        log.warning("inbox file %s rejected: %s", source, error)
        marker = {**marker, "state": "rejected", "reason": str(error)}
        put_json(store, marker_key, marker)
        _replace_outbox(store, name, {"state": "rejected", "reason": str(error),
                                      "source": {"key": source, "etag": marker["etag"]}})
        return marker
    except Exception:  # an outage: give the file back to the next scan
        log.exception("inbox file %s not submitted; a later scan will retry", source)
        store.delete(marker_key)
        return None
    # Written before the marker says submitted: a finalizer that misses either one ended
    # the job before scan_inbox, right after this, tries to deliver it, and so that try does.
    put_json(store, keys.inbox_source_key(job.id), {"key": source, "etag": marker["etag"]})
    marker = {**marker, "state": "submitted", "job_id": job.id, "submitted_at": utc_now()}
    put_json(store, marker_key, marker)
    log.info("inbox file %s submitted as job %s", source, job.id)
    return marker


def _deliver(store: Store, name: str, marker_key: str, marker: dict[str, Any]) -> bool:
    """Copy a finished job to outbox/NAME/; False while the job is still going."""
    job_id = marker["job_id"]
    try:
        job = manifest.load_manifest(store, job_id)
    except UserError:  # expired before it could be delivered
        put_json(store, marker_key, {**marker, "state": "expired"})
        return False
    if job["state"] not in manifest.TERMINAL_STATES:
        return False
    _replace_outbox(store, name, {**job, "source": {"key": marker["source"],
                                                     "etag": marker["etag"]}},
                    job_id=job_id)
    put_json(store, marker_key, {**marker, "state": "delivered", "delivered_at": utc_now()})
    log.info("job %s delivered to %s%s/", job_id, OUTBOX_PREFIX, name)
    return True


def deliver_finished_job(store: Store, job: dict[str, Any]) -> bool:
    """Deliver a job its finalizer has just ended (job: its manifest) to outbox/NAME/ now, if
    it came from the inbox and is its file's current version, as the next scan would; True
    if this call delivered it. A job not from the inbox costs one read.

    A cancelled job is left to the scan: it ends when the cancel is seen, and its shards
    still running add their rows to it as they stop.
    """
    if job["state"] == JobState.CANCELLED:
        return False
    try:
        source = get_json(store, keys.inbox_source_key(job["job_id"]))
    except NotFound:
        return False
    name = _inbox_name(source["key"])
    if name is None:
        return False
    marker_key = _marker_key(name, source["etag"])
    try:
        marker = get_json(store, marker_key)
    except NotFound:  # deleted by hand to submit the file again: the next scan does that
        return False
    # Delivered already, or the scan has not recorded the job yet (it delivers it itself then).
    if marker["state"] != "submitted" or marker["job_id"] != job["job_id"]:
        return False
    try:
        if store.etag(source["key"]) != source["etag"]:
            return False  # a newer version of the file owns outbox/NAME/ now
    except NotFound:
        return False  # the file is gone: no scan would deliver its job either
    return _deliver(store, name, marker_key, marker)


def _replace_outbox(store: Store, name: str, summary: dict[str, Any],
                    job_id: str | None = None) -> None:
    """Make outbox/NAME/ hold this job's files, manifest.json last (the "done" signal)."""
    folder = f"{OUTBOX_PREFIX}{name}/"
    store.delete(folder + "manifest.json")  # no stale "done" over files being replaced
    written = {folder + "manifest.json"}
    if job_id is not None:
        if store.list(keys.results_prefix(job_id)):
            with tempfile.TemporaryDirectory(prefix="batchinfer-outbox-") as scratch:
                local = Path(scratch) / "results.parquet"
                write_results_file(store, job_id, local)
                store.upload_file(local, folder + "results.parquet")
            written.add(folder + "results.parquet")
        errors = merge_errors(store, job_id)  # the rows failed now, after any retry
        if errors is not None:
            put_table(store, folder + "errors.parquet", errors)
            written.add(folder + "errors.parquet")
    for key in store.list(folder):
        if key not in written:
            store.delete(key)
    put_json(store, folder + "manifest.json", summary)
