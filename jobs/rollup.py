"""The daily usage rollup: one day's usage records summed per model into
`usage/daily/date=YYYY-MM-DD/summary.parquet` (a rerun writes the same bytes).

Beat runs it nightly for yesterday (workers/nightly_tasks.py); `batchinfer nightly
rollup-usage [--date D]` runs it by hand.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from jobs import keys
from jobs.errors import UserError
from jobs.store import Store
from jobs.tables import put_table, read_table

DAILY_USAGE_PREFIX = "usage/daily/"

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
    return ((now or datetime.now(UTC)).astimezone(UTC)
            - timedelta(days=1)).date()
