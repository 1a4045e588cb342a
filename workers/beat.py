"""Celery beat for the nightly tasks: `batchinfer beat` (or `celery -A workers.beat beat`).

When each task runs comes from the environment, as a cron expression in UTC (five fields)
or a number of seconds (for tests and tight loops):
  BATCHINFER_SCAN_INBOX_CRON  default */5 * * * *   scan the inbox, deliver to the outbox
  BATCHINFER_ROLLUP_CRON      default 30 0 * * *    roll up yesterday's usage
  BATCHINFER_EXPIRE_CRON      default 0 3 * * *     delete jobs past BATCHINFER_RETENTION_DAYS
and, every BATCHINFER_LEASE_SECONDS / 4 seconds (default 60 / 4 = 15), the shard watchdog:
  requeue-expired-shards    send again every shard whose worker stopped renewing its lease
                            (workers/leases.py; each `batchinfer worker` launcher also runs
                            it in a thread, and claims are atomic, so both may run)
The tasks go to their own queue, which a CPU worker serves (see compose/), so they never
wait behind long shards on the GPU workers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NoReturn

from celery.schedules import crontab

from jobs import expiry, settings
from jobs.errors import UserError
from workers.app import create_app
from workers.leases import lease_seconds

NIGHTLY_QUEUE = "batchinfer.nightly"
# (beat entry, task, schedule variable, its default, seconds after which an unstarted
# run is dropped: a backlog of scans behind a stopped worker is worth one scan, not many)
_ENTRIES = (
    ("scan-inbox", "batchinfer.nightly.scan_inbox", "BATCHINFER_SCAN_INBOX_CRON",
     "*/5 * * * *", 300),
    ("rollup-usage", "batchinfer.nightly.rollup_usage", "BATCHINFER_ROLLUP_CRON",
     "30 0 * * *", 12 * 3600),
    ("expire-jobs", "batchinfer.nightly.expire_jobs", "BATCHINFER_EXPIRE_CRON",
     "0 3 * * *", 12 * 3600),
)


def parse_schedule(variable: str, text: str) -> crontab | float:
    """A five-field cron expression, or a positive number of seconds."""
    fields = text.split()
    try:
        if len(fields) == 5:
            minute, hour, day_of_month, month_of_year, day_of_week = fields
            return crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                           month_of_year=month_of_year, day_of_week=day_of_week)
        if len(fields) == 1 and float(fields[0]) > 0:
            return float(fields[0])
    except ValueError:
        pass
    raise UserError(f"{variable}: {text!r} is neither a cron expression "
                    f"(minute hour day month weekday) nor a number of seconds")


def beat_schedule(environ: Mapping[str, str]) -> dict:
    """Celery's beat_schedule for the nightly tasks, from the environment."""
    schedule = {}
    for entry, task, variable, default, expires in _ENTRIES:
        schedule[entry] = {
            "task": task,
            "schedule": parse_schedule(variable, environ.get(variable) or default),
            "options": {"queue": NIGHTLY_QUEUE, "expires": expires},
        }
    schedule["expire-jobs"]["kwargs"] = {
        "retention_days": expiry.retention_days_from_env(environ)}
    interval = watchdog_seconds(environ)
    schedule["requeue-expired-shards"] = {
        "task": "batchinfer.ops.requeue_expired_shards",
        "schedule": interval,
        # A pass that waited longer than the interval is superseded by the next one.
        "options": {"queue": NIGHTLY_QUEUE, "expires": interval},
    }
    return schedule


def watchdog_seconds(environ: Mapping[str, str]) -> float:
    """The watchdog's interval: a quarter of the lease, as in the launcher's thread."""
    return lease_seconds(environ) / 4


def run_beat(loglevel: str = "INFO") -> NoReturn:
    """Replace this process with Celery beat (signals from a supervisor reach it directly).

    Importing this module has already read the schedule, so a bad variable is a one-line
    error before beat starts."""
    state = settings.home() / "celerybeat-schedule"
    state.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "workers.beat", "beat",
            "--schedule", str(state), "--loglevel", loglevel]
    os.execv(argv[0], argv)


app = create_app()
# Beat sends tasks by name and needs none of their code, which would load the engine (torch).
app.conf.include = []
app.conf.beat_schedule = beat_schedule(os.environ)
