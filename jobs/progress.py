"""Live progress of running shards: one small JSON object per shard in the store.

The runner rewrites its shard's object every couple of seconds; the CLI and the client
add them up for a progress bar. (Workers also send the same numbers to Flower.)
"""

from __future__ import annotations

from typing import Any

from jobs import keys
from jobs.manifest import utc_now
from jobs.store import NotFound, Store, get_json, put_json


def write_progress(store: Store, job_id: str, shard_index: int, done: int, total: int,
                   tokens: int, tokens_per_second: float, batch_fill: float) -> None:
    """tokens: prompt + completion tokens of the shard's rows finished so far."""
    put_json(store, keys.progress_key(job_id, shard_index), {
        "shard": shard_index, "done": done, "total": total, "tokens": tokens,
        "tokens_per_second": tokens_per_second, "batch_fill": batch_fill,
        "updated_at": utc_now(),
    })


def read_progress(store: Store, job_id: str) -> dict[str, Any]:
    """All shards' progress added up.

    rows_done / rows_total and tokens count the rows of the shards that have reported so
    far; tokens_per_second and batch_fill describe the shards still running (sum and mean).
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
        "rows_total": sum(s["total"] for s in shards),
        "tokens": sum(s.get("tokens", 0) for s in shards),  # absent from older workers' objects
        "shards_reporting": len(shards),
        "shards_running": len(running),
        "tokens_per_second": sum(s["tokens_per_second"] for s in running),
        "batch_fill": (sum(s["batch_fill"] for s in running) / len(running)) if running else 0.0,
        "shards": sorted(shards, key=lambda s: s["shard"]),
    }
