"""Celery beat sends the nightly tasks on the schedule from the environment: a real
`batchinfer beat` process against the test Redis, seen through the nightly queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from celery.schedules import crontab

from jobs.errors import UserError
from tests.servers import log_tail
from workers.beat import NIGHTLY_QUEUE, beat_schedule, parse_schedule


def test_schedule_from_the_environment():
    schedule = beat_schedule({"BATCHINFER_SCAN_INBOX_CRON": "2.5",
                              "BATCHINFER_EXPIRE_CRON": "15 4 * * sun",
                              "BATCHINFER_RETENTION_DAYS": "14"})
    assert schedule["scan-inbox"]["schedule"] == 2.5
    assert schedule["rollup-usage"]["schedule"] == crontab(minute="30", hour="0")
    assert schedule["expire-jobs"]["schedule"] == crontab(minute="15", hour="4",
                                                          day_of_week="sun")
    assert schedule["expire-jobs"]["kwargs"] == {"retention_days": 14}
    assert {entry["options"]["queue"] for entry in schedule.values()} == {NIGHTLY_QUEUE}
    assert beat_schedule({})["scan-inbox"]["schedule"] == crontab(minute="*/5")


@pytest.mark.parametrize("text", ["", "every 5 minutes", "61 * * * *", "-1", "* * * *"])
def test_a_bad_schedule_is_a_user_error(text):
    with pytest.raises(UserError, match="BATCHINFER_ROLLUP_CRON"):
        parse_schedule("BATCHINFER_ROLLUP_CRON", text)


def beat_env(tmp_path, broker_url: str, **extra: str) -> dict:
    return os.environ | {"BATCHINFER_BROKER_URL": broker_url,
                         "BATCHINFER_HOME": str(tmp_path / "home"), **extra}


def test_beat_refuses_a_bad_schedule_in_one_line(tmp_path, redis_server):
    env = beat_env(tmp_path, redis_server.url, BATCHINFER_SCAN_INBOX_CRON="soon")
    done = subprocess.run([sys.executable, "-m", "workers.cli", "beat"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "BATCHINFER_SCAN_INBOX_CRON" in done.stderr


def test_beat_sends_the_scan_on_schedule(tmp_path, redis_server):
    queue = redis.Redis.from_url(redis_server.url)
    queue.delete(NIGHTLY_QUEUE)
    # A long lease keeps the watchdog entry (every lease / 4) out of this short run.
    env = beat_env(tmp_path, redis_server.url, BATCHINFER_SCAN_INBOX_CRON="1",
                   BATCHINFER_LEASE_SECONDS="3600")
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        beat = subprocess.Popen([sys.executable, "-m", "workers.cli", "beat"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while queue.llen(NIGHTLY_QUEUE) < 2 and time.monotonic() < deadline:
            assert beat.poll() is None, log_tail(log)
            time.sleep(0.2)
        messages = [json.loads(m) for m in queue.lrange(NIGHTLY_QUEUE, 0, -1)]
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)
    assert len(messages) >= 2, log_tail(log)
    assert {m["headers"]["task"] for m in messages} == {"batchinfer.nightly.scan_inbox"}
    assert all(m["headers"]["expires"] for m in messages)  # a backlog of scans is dropped
    assert (tmp_path / "home" / "celerybeat-schedule").exists() or any(
        p.name.startswith("celerybeat-schedule") for p in (tmp_path / "home").iterdir())
