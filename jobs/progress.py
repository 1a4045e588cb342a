"""Live progress of running shards: one small JSON object per shard in the store.

The runner rewrites its shard's object every couple of seconds; the CLI and the client
add them up for a progress bar. (Workers also send the same numbers to Flower.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jobs import keys
from jobs.manifest import TERMINAL_STATES, utc_now
from jobs.store import NotFound, Store, get_json, json_bytes


def write_progress(store: Store, job_id: str, shard_index: int, done: int, total: int,
                   tokens: int, tokens_per_second: float, occupancy: float,
                   failed: int = 0, first: bool = False) -> bool:
    """done: rows finished so far, failed: those of them that failed; tokens: prompt +
    completion tokens of the finished rows.

    first: a run's first write, which says whether it is the shard's first run to get this
    far: True if it created the shard's progress object (no run before wrote one), False
    if it replaced one (or was not a first write).
    """
    key = keys.progress_key(job_id, shard_index)
    data = json_bytes({
        "shard": shard_index, "done": done, "failed": failed, "total": total, "tokens": tokens,
        "tokens_per_second": tokens_per_second, "occupancy": occupancy,
        "updated_at": utc_now(),
    })
    if first and store.create_once(key, data):
        return True
    store.put_bytes(key, data)
    return False


def read_progress(store: Store, job_id: str) -> dict[str, Any]:
    """All shards' progress added up.

    rows_done / rows_total and tokens count the rows of the shards that have reported so
    far; tokens_per_second and occupancy describe the shards still running (sum and mean).
    """
    shards = []
    for key in store.list(keys.progress_prefix(job_id)):
        try:
            shards.append(get_json(store, key))
        except NotFound:  # deleted between the listing and the read
            continue
    running = [s for s in shards if s["done"] < s["total"]]
    return {
        "rows_done": sum(s["done"] for s in shards),
        "rows_failed": sum(s.get("failed", 0) for s in shards),
        "rows_total": sum(s["total"] for s in shards),
        "tokens": sum(s.get("tokens", 0) for s in shards),  # absent from older workers' objects
        "shards_reporting": len(shards),
        "shards_running": len(running),
        "tokens_per_second": sum(s["tokens_per_second"] for s in running),
        "occupancy": (sum(s.get("occupancy", 0.0) for s in running) / len(running)
                      if running else 0.0),
        "shards": sorted(shards, key=lambda s: s["shard"]),
    }


def with_live_progress(store: Store, status: dict[str, Any]) -> dict[str, Any]:
    """A job's manifest as callers show it: while the job runs, with the shards' live
    progress under "progress" and counts that move (add_live_counts)."""
    if status["state"] not in TERMINAL_STATES:
        status["progress"] = live = read_progress(store, status["job_id"])
        add_live_counts(store, status, live)
    return status


def add_live_counts(store: Store, status: dict[str, Any], live: dict[str, Any],
                    now: datetime | None = None) -> None:
    """Make a running job's counts move: shards done as their parts land, rows done (and
    of them failed) from the shards' progress, and an ETA from the rows per second since
    the job started. A retry round's progress covers only the rows it runs again, so its
    counts stay those of the finished run before it (the bar shows the round's own)."""
    counts = status["counts"]
    counts["shards_done"] = sum(1 for key in store.list(keys.results_prefix(status["job_id"]))
                                if keys.part_of_key(key)[1] == 0)
    if status.get("retry"):
        return
    done = min(live["rows_done"], counts["total_rows"])
    counts["failed_rows"] = live["rows_failed"]
    counts["succeeded_rows"] = done - live["rows_failed"]
    live["eta_seconds"] = eta_seconds(done, counts["total_rows"], status.get("started_at"), now)


def eta_seconds(done: int, total: int, started_at: str | None,
                now: datetime | None = None) -> float | None:
    """Seconds left at the rate rows have finished since started_at (None: no rate yet)."""
    if not done or not started_at:
        return None
    elapsed = ((now or datetime.now(UTC)) - datetime.fromisoformat(started_at))
    seconds = elapsed.total_seconds()
    return (total - done) * seconds / done if seconds > 0 else None
