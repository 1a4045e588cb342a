"""Every object key the jobs layer uses, built only from a validated job id and fixed names.

A job id is a uuid4 in lowercase hex, so nothing a user types can add a `/` or `..` to a
key; the stores refuse such keys as a second line of defence.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import date

from jobs.errors import UserError

JOBS_PREFIX = "jobs/"
USAGE_PREFIX = "usage/"
IDEMPOTENCY_PREFIX = "idempotency/"
# Five digits keep part files in shard order when listed; the planner refuses more shards.
SHARD_DIGITS = 5
MAX_SHARDS = 10**SHARD_DIGITS

# Retries of a shard's failed rows are numbered by retry round: part-00003-r001.parquet.
ATTEMPT_DIGITS = 3
MAX_ATTEMPTS = 10**ATTEMPT_DIGITS

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_SHARD_SUFFIX = re.compile(
    rf"-(\d{{{SHARD_DIGITS}}})(?:-r(\d{{{ATTEMPT_DIGITS}}}))?\.(?:parquet|json)$")


def new_job_id() -> str:
    """A fresh random job id (never derived from user input)."""
    return uuid.uuid4().hex


def validate_job_id(job_id: str) -> str:
    """Return job_id if it is a uuid4 in lowercase hex, else raise UserError."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise UserError(f"invalid job id {job_id!r}: expected 32 lowercase hex digits")
    if uuid.UUID(hex=job_id).version != 4:
        raise UserError(f"invalid job id {job_id!r}: not a uuid4")
    return job_id


def _shard(index: int) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_SHARDS:
        raise ValueError(f"shard index must be an integer in [0, {MAX_SHARDS}), got {index!r}")
    return f"{index:0{SHARD_DIGITS}d}"


def _attempt(attempt: int) -> str:
    """"" for a shard's first run (attempt 0), "-rNNN" for a retry round's rerun of its rows."""
    if (isinstance(attempt, bool) or not isinstance(attempt, int)
            or not 0 <= attempt < MAX_ATTEMPTS):
        raise ValueError(f"attempt must be an integer in [0, {MAX_ATTEMPTS}), got {attempt!r}")
    return f"-r{attempt:0{ATTEMPT_DIGITS}d}" if attempt else ""


def job_prefix(job_id: str) -> str:
    return f"{JOBS_PREFIX}{validate_job_id(job_id)}/"


def spec_key(job_id: str) -> str:
    return job_prefix(job_id) + "spec.json"


def input_key(job_id: str) -> str:
    return job_prefix(job_id) + "input.parquet"


def manifest_key(job_id: str) -> str:
    return job_prefix(job_id) + "manifest.json"


def cancel_key(job_id: str) -> str:
    """Present while a cancel stands: a marker that no manifest write can lose."""
    return job_prefix(job_id) + "cancel.json"


def inbox_source_key(job_id: str) -> str:
    """Beside a job from the inbox: the file version it came from, for its finalizer."""
    return job_prefix(job_id) + "inbox.json"


def shards_done_key(job_id: str) -> str:
    """Which shards of the job's first run are accounted for: one object the shards update,
    so that a shard learns whether it was the last without listing every part."""
    return job_prefix(job_id) + "shards-done.json"


def results_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "results/"


def result_key(job_id: str, shard: int, attempt: int = 0) -> str:
    """A shard's results part; attempt N >= 1: the rows retry round N ran again."""
    return f"{results_prefix(job_id)}part-{_shard(shard)}{_attempt(attempt)}.parquet"


def errors_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "errors/"


def error_key(job_id: str, shard: int, attempt: int = 0) -> str:
    return f"{errors_prefix(job_id)}part-{_shard(shard)}{_attempt(attempt)}.parquet"


def progress_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "progress/"


def progress_key(job_id: str, shard: int) -> str:
    return f"{progress_prefix(job_id)}shard-{_shard(shard)}.json"


def failures_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "failures/"


def failure_key(job_id: str, shard: int, attempt: int = 0) -> str:
    """Where a shard that could not run at all (say, its model would not load) says why."""
    return f"{failures_prefix(job_id)}shard-{_shard(shard)}{_attempt(attempt)}.json"


def retries_prefix(job_id: str) -> str:
    return job_prefix(job_id) + "retries/"


def retry_round_key(job_id: str, round_number: int) -> str:
    """The plan of retry round N, created once: two racing `retry` commands start one round."""
    if round_number < 1:
        raise ValueError(f"retry rounds start at 1, got {round_number}")
    return f"{retries_prefix(job_id)}round{_attempt(round_number)}.json"


def idempotency_key(key: str) -> str:
    """The index object of a submit idempotency key: only a hash of it goes into the key."""
    return f"{IDEMPOTENCY_PREFIX}{hashlib.sha256(key.encode()).hexdigest()}.json"


def usage_prefix(day: date, job_id: str) -> str:
    """The prefix of one job's usage records for one day."""
    return f"{USAGE_PREFIX}date={day.isoformat()}/{validate_job_id(job_id)}-"


def usage_key(day: date, job_id: str, shard: int, attempt: int = 0) -> str:
    return f"{usage_prefix(day, job_id)}{_shard(shard)}{_attempt(attempt)}.parquet"


def part_of_key(key: str) -> tuple[int, int]:
    """(shard, attempt) of a part, failure, progress or usage key (attempt 0: the first run)."""
    match = _SHARD_SUFFIX.search(key)
    if match is None:
        raise ValueError(f"not a per-shard key: {key!r}")
    return int(match.group(1)), int(match.group(2) or 0)
