"""Shard leases in Redis: which worker runs which shard, renewed while it runs.

Redis gives an unacknowledged task back only after the broker's visibility timeout, which
must be longer than the longest shard (else healthy shards would run twice). A worker that
dies (kill -9, lost machine) would leave its shard stuck for that long. Instead, a running
shard holds a lease that its worker renews every few seconds; when a lease has not been
renewed for BATCHINFER_LEASE_SECONDS, the watchdog (workers/watchdog.py) sends the shard
again. Each lease names its holder (a random token), so a worker that was presumed dead
and comes back neither renews nor releases the lease of the shard's new run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import redis

from jobs.settings import env_number

log = logging.getLogger(__name__)

LEASES_KEY = "batchinfer:shard-leases"
DEFAULT_LEASE_SECONDS = 60.0

# Re-queue a lease only if nobody renewed or re-queued it since we read it.
_CLAIM_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
# Renew (ARGV[3] = the new value) or release (ARGV[3] = "") a lease only while it is still
# ours: its holder is ARGV[2]. (A lease the watchdog re-armed keeps its holder, so the
# worker that was only slow may still renew it; one taken by the shard's next run may not.)
_HOLDER_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
if cjson.decode(current)['holder'] ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""


def lease_seconds(environ: Mapping[str, str] = os.environ) -> float:
    return env_number("BATCHINFER_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, environ, positive=True)


def supports_leases(broker_url: str) -> bool:
    """Leases live beside a Redis broker; the embedded broker has no redelivery to guard."""
    return broker_url.startswith(("redis://", "rediss://"))


class ShardLeases:
    """One Redis hash: field "<job_id>:<shard>" -> the shard's task arguments and deadline."""

    def __init__(self, redis_url: str, seconds: float | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.seconds = seconds if seconds is not None else lease_seconds()

    def _now(self) -> float:
        # The server's clock, so workers on machines with skewed clocks agree.
        secs, micros = self.redis.time()
        return secs + micros / 1e6

    @staticmethod
    def field(job_id: str, shard_index: int) -> str:
        return f"{job_id}:{shard_index}"

    def acquire(self, task: dict) -> tuple[str, dict]:
        """task: the run_shard arguments (job_id, shard_index, shards_total, store_url,
        attempt) and queue. Returns the lease's field and value (with its holder token)."""
        field = self.field(task["job_id"], task["shard_index"])
        lease = dict(task, holder=uuid.uuid4().hex, expires_at=self._now() + self.seconds)
        self.redis.hset(LEASES_KEY, field, json.dumps(lease, sort_keys=True))
        return field, lease

    def renew(self, field: str, lease: dict) -> bool:
        """Push the deadline back; False if the lease is no longer ours."""
        renewed = dict(lease, expires_at=self._now() + self.seconds)
        return bool(self.redis.eval(_HOLDER_SCRIPT, 1, LEASES_KEY, field, lease["holder"],
                                    json.dumps(renewed, sort_keys=True)))

    def release(self, field: str, lease: dict) -> bool:
        return bool(self.redis.eval(_HOLDER_SCRIPT, 1, LEASES_KEY, field, lease["holder"], ""))

    def fields(self) -> set[str]:
        """The fields ("<job_id>:<shard>") of every lease, expired or not."""
        return {f.decode() if isinstance(f, bytes) else f
                for f in self.redis.hkeys(LEASES_KEY)}

    def live(self) -> list[dict]:
        """The leases not expired: the shards some worker is running now."""
        now = self._now()
        leases = [json.loads(raw) for raw in self.redis.hvals(LEASES_KEY)]
        return [lease for lease in leases if lease["expires_at"] > now]

    def claim_expired(self) -> list[dict]:
        """The expired leases that this caller won (each is re-armed, so exactly one watchdog
        re-queues it, and again only if the new run also goes silent)."""
        now = self._now()
        claimed = []
        for field, raw in self.redis.hgetall(LEASES_KEY).items():
            task = json.loads(raw)
            if task["expires_at"] > now:
                continue
            renewed = json.dumps(dict(task, expires_at=now + self.seconds), sort_keys=True)
            if self.redis.eval(_CLAIM_SCRIPT, 1, LEASES_KEY, field, raw, renewed):
                claimed.append(task)
        return claimed

    @contextmanager
    def held(self, task: dict) -> Iterator[None]:
        """Hold the shard's lease, renewed in the background, while the block runs.

        Redis being unreachable must not fail the shard (its work is in the store): taking,
        renewing and releasing the lease are each tried, and a failure is only logged.
        """
        try:
            field, lease = self.acquire(task)
        except redis.RedisError as exc:
            log.warning("shard lease not taken (the shard runs without one): %s", exc)
            yield
            return
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(self.seconds / 4):
                try:
                    if not self.renew(field, lease):
                        log.warning("lease %s was taken over; the shard runs on (its parts "
                                    "are written once whoever finishes first)", field)
                        return
                except redis.RedisError as exc:  # Redis restarting: keep trying
                    log.warning("lease renewal failed: %s", exc)

        renewer = threading.Thread(target=renew_until_stopped, name="lease-renewer", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                self.release(field, lease)
            except redis.RedisError as exc:  # the watchdog will re-queue it; the rerun skips
                log.warning("lease %s not released: %s", field, exc)
