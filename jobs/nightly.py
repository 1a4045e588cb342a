"""The pipeline's scheduled work, on a Store (workers/nightly_tasks.py binds it to Celery beat).

Inbox: every `inbox/NAME.parquet` becomes one job, exactly once per version of the file.
- Each version (object key + ETag) gets a marker, `inbox/_processed/NAME.<etag>.json`,
  created with a create-once write (jobs/claims.py): of two scans racing for the same file
  only one wins, and the file is submitted once. A new upload (new ETag) is a new job.
- The spec is `inbox/NAME.spec.json` (keys: the submit flags' long names with underscores)
  over the defaults from BATCHINFER_INBOX_<FLAG> variables. Upload the spec first: the
  parquet file's ETag alone names the version, so a spec changed later is not seen.
- A file that cannot become a job (no model, a missing column...) is rejected once: its
  marker and `outbox/NAME/manifest.json` say why. Delete the marker to try again.
- Delivery: each scan also looks at submitted files whose job has ended and copies the job
  to `outbox/NAME/`: `results.parquet` (merged, input order) and `errors.parquet` where the
  job has such rows, then `manifest.json` (the job's manifest plus the source key and ETag).
  manifest.json is written last: a pipeline waits for it. A later version of NAME replaces
  the folder.
- A scanner that died between claiming a file and recording its job leaves a claim that
  goes stale after STALE_CLAIM_SECONDS; the next scan takes the file over. The job's
  idempotency key, derived from key and ETag, keeps that takeover from creating a second job.

Usage rollup: one day's usage records summed per model into
`usage/daily/date=YYYY-MM-DD/summary.parquet` (a rerun writes the same bytes).

Expiry: finished jobs (completed, failed, cancelled) older than the retention are deleted;
jobs still validating, queued, running or finalizing never are. Usage records stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs import keys, manifest
from jobs.claims import create_once
from jobs.delete import delete_job_objects
from jobs.errors import UserError
from jobs.outcomes import merge_errors
from jobs.results import write_results_file
from jobs.store import NotFound, Store, get_json, put_json
from jobs.tables import put_table, read_table

log = logging.getLogger(__name__)

INBOX_PREFIX = "inbox/"
MARKERS_PREFIX = "inbox/_processed/"
OUTBOX_PREFIX = "outbox/"
DAILY_USAGE_PREFIX = "usage/daily/"
# Long enough for a scanner to download and validate a large file before it records the job.
STALE_CLAIM_SECONDS = 3600
DEFAULT_RETENTION_DAYS = 30

# What an inbox spec may set: the submit flags (long names, underscores), and how to read
# each from a BATCHINFER_INBOX_<FLAG> variable.
SPEC_FIELDS: dict[str, Callable[[str], Any]] = {
    "model": str, "prompt_column": str, "messages_column": str, "id_column": str,
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
    "stop": str, "shard_size": int, "queue": str,
}
# Inbox names become object keys and outbox folders: no "/", no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

# client_submit(local_parquet_path, **spec) -> a job (anything with .id), e.g. Client().submit.
Submit = Callable[..., Any]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


# --- inbox -----------------------------------------------------------------------------

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
        marker_key = f"{MARKERS_PREFIX}{name}.{_safe_etag(etag)}.json"
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


def _safe_etag(etag: str) -> str:
    """ETags are hex (S3, with -N for multipart uploads) here; anything else is hashed."""
    if re.fullmatch(r"[A-Za-z0-9-]{1,64}", etag):
        return etag
    return hashlib.sha256(etag.encode()).hexdigest()[:32]


def _claim(store: Store, marker_key: str, key: str, etag: str) -> dict[str, Any] | None:
    """This file version's marker: a fresh claim when this scan should submit it, the
    existing marker when one is already there, None when another scan holds the claim."""
    try:
        marker = get_json(store, marker_key)
    except NotFound:
        marker = None
    if marker is not None:
        if marker["state"] != "claimed":
            return marker
        claimed_at = datetime.fromisoformat(marker["claimed_at"])
        if (_now() - claimed_at).total_seconds() <= STALE_CLAIM_SECONDS:
            return None  # another scan is submitting it
        log.warning("taking over %s: its claim went stale", key)
        store.delete(marker_key)
    claim = {"source": key, "etag": etag, "state": "claimed", "claimed_at": _stamp(_now())}
    if not create_once(store, marker_key, json.dumps(claim, sort_keys=True).encode()):
        return None
    return claim


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
    marker = {**marker, "state": "submitted", "job_id": job.id, "submitted_at": _stamp(_now())}
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
    put_json(store, marker_key, {**marker, "state": "delivered", "delivered_at": _stamp(_now())})
    log.info("job %s delivered to %s%s/", job_id, OUTBOX_PREFIX, name)
    return True


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


# --- usage rollup ------------------------------------------------------------------------

SUMMARY_SCHEMA = pa.schema([
    ("date", pa.date32()),
    ("model", pa.string()),
    ("jobs", pa.int64()),
    ("shards", pa.int64()),
    ("rows", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cached_tokens", pa.int64()),
    ("busy_hours", pa.float64()),
    ("cost_usd", pa.float64()),
    ("cost_per_million_tokens", pa.float64()),
])
_SUMMED = ("rows", "prompt_tokens", "completion_tokens", "cached_tokens", "busy_seconds",
           "cost_usd")


def summary_key(day: date) -> str:
    return f"{DAILY_USAGE_PREFIX}date={day.isoformat()}/summary.parquet"


def rollup_usage(store: Store, day: date) -> dict[str, Any]:
    """Sum the day's usage records per model into its summary (an empty day gets an empty one).

    Tokens are prompt + completion, as in jobs/usage.py, for the cost per million tokens.
    """
    totals: dict[str, dict[str, Any]] = {}
    records = 0
    for key in store.list(f"{keys.USAGE_PREFIX}date={day.isoformat()}/"):
        for record in read_table(store, key).to_pylist():
            records += 1
            sums = totals.setdefault(record["model"], {"jobs": set(), "shards": 0,
                                                       **dict.fromkeys(_SUMMED, 0)})
            sums["jobs"].add(record["job_id"])
            sums["shards"] += 1
            for field in _SUMMED:
                sums[field] += record[field]
    rows = []
    for model in sorted(totals):
        sums = totals[model]
        tokens = sums["prompt_tokens"] + sums["completion_tokens"]
        rows.append({
            "date": day, "model": model, "jobs": len(sums["jobs"]), "shards": sums["shards"],
            "rows": sums["rows"], "prompt_tokens": sums["prompt_tokens"],
            "completion_tokens": sums["completion_tokens"], "cached_tokens": sums["cached_tokens"],
            "busy_hours": sums["busy_seconds"] / 3600, "cost_usd": sums["cost_usd"],
            "cost_per_million_tokens": sums["cost_usd"] / tokens * 1e6 if tokens else 0.0,
        })
    key = summary_key(day)
    put_table(store, key, pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA))
    return {"key": key, "records": records, "models": len(rows)}


def parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UserError(f"invalid date {text!r}: expected YYYY-MM-DD") from None


def yesterday(now: datetime | None = None) -> date:
    """The UTC day before now: the last complete day of usage records."""
    return ((now or _now()).astimezone(timezone.utc) - timedelta(days=1)).date()


# --- expiry ------------------------------------------------------------------------------

def retention_days_from_env(environ: Mapping[str, str]) -> int:
    raw = environ.get("BATCHINFER_RETENTION_DAYS") or str(DEFAULT_RETENTION_DAYS)
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"BATCHINFER_RETENTION_DAYS must be a whole number, got {raw!r}") from None


def expire_jobs(store: Store, retention_days: int, now: datetime | None = None) -> list[str]:
    """Delete finished jobs that ended (or, lacking an end, began) over retention_days ago.

    Returns the deleted job ids. Jobs that are not finished are never touched.
    """
    if retention_days < 1:
        raise UserError(f"retention must be at least 1 day, got {retention_days}")
    cutoff = (now or _now()) - timedelta(days=retention_days)
    expired = []
    for job in manifest.list_manifests(store):
        # Read again just before deleting: a retry may have re-queued it since the listing.
        if _expired(job, cutoff) and _expired(manifest.load_manifest(store, job["job_id"]),
                                              cutoff):
            delete_job_objects(store, job["job_id"])
            log.info("job %s expired", job["job_id"])
            expired.append(job["job_id"])
    return expired


def _expired(job: dict[str, Any], cutoff: datetime) -> bool:
    stamp = job.get("finished_at") or job.get("created_at")
    return (job.get("state") in manifest.TERMINAL_STATES and stamp is not None
            and datetime.fromisoformat(stamp) < cutoff)


