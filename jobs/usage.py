"""Usage records: one per shard, in usage/date=YYYY-MM-DD/<job_id>-NNNNN.parquet, and one
per retry of a shard's rows (round R), in ...-NNNNN-rRRR.parquet: a retry is work, and costs.

Conventions used here and in the manifest's usage totals:
- tokens = prompt_tokens + completion_tokens (cached prompt tokens are part of prompt_tokens);
- busy_seconds: the wall time the shard held the engine; where shards share one engine
  (a worker running two at once), the shard's share of its steps, by tokens, so the
  shards' records add up to the engine's time, not twice it;
- tokens_per_second = tokens / busy_seconds;
- cost_usd = busy_seconds / 3600 x the worker's hourly price (BATCHINFER_GPU_HOURLY_USD);
- cost_per_million_tokens = cost_usd / tokens x 1e6;
- occupancy = sequences in each engine step / max_num_seqs, averaged over the steps the
  shard ran (1.0: every step ran the most sequences the engine allows);
- mean_tokens_per_step = tokens computed per engine step (prompt chunks + decodes).
Records written before occupancy existed carry mean_batch_fill (a token-budget share)
instead; they read with occupancy and mean_tokens_per_step null.
The date is the UTC day the shard finished.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import pyarrow as pa

from jobs import keys, rollup
from jobs.store import Store
from jobs.tables import put_table, read_table

USAGE_SCHEMA = pa.schema([
    ("job_id", pa.string()),
    ("shard", pa.int64()),
    ("model", pa.string()),
    ("quantization", pa.string()),
    ("worker", pa.string()),
    ("device", pa.string()),
    ("rows", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cached_tokens", pa.int64()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("busy_seconds", pa.float64()),
    ("tokens_per_second", pa.float64()),
    ("occupancy", pa.float64()),
    ("mean_tokens_per_step", pa.float64()),
    ("cost_usd", pa.float64()),
    ("cost_per_million_tokens", pa.float64()),
    ("weight_bytes", pa.int64()),  # the engine's stats()["weight_bytes"]; null if not known
])


@dataclass(frozen=True)
class UsageRecord:
    job_id: str
    shard: int
    model: str
    quantization: str | None
    worker: str
    device: str
    rows: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    started_at: datetime
    finished_at: datetime
    busy_seconds: float
    tokens_per_second: float
    occupancy: float | None  # None in records written before it was measured
    mean_tokens_per_step: float | None
    cost_usd: float
    cost_per_million_tokens: float
    weight_bytes: int | None = None  # bytes of weights the engine held (packed if quantized)


@dataclass(frozen=True)
class BatchFigures:
    """How full the engine's batches were between two llm.stats() snapshots."""

    occupancy: float  # sequences per step / max_num_seqs
    mean_tokens_per_step: float

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> BatchFigures:
        steps = after["steps"] - before["steps"]
        if steps <= 0:
            return cls(0.0, 0.0)
        seqs = after["scheduled_seqs"] - before["scheduled_seqs"]
        tokens = after["scheduled_tokens"] - before["scheduled_tokens"]
        return cls(seqs / (steps * after["max_num_seqs"]), tokens / steps)


def make_usage_record(*, job_id: str, shard: int, model: str, quantization: str | None,
                      worker: str, device: str, rows: int, prompt_tokens: int,
                      completion_tokens: int, cached_tokens: int, started_at: datetime,
                      finished_at: datetime, busy_seconds: float, batch: BatchFigures,
                      hourly_usd: float, weight_bytes: int | None = None) -> UsageRecord:
    """A record with the derived fields (throughput, cost) computed as the module says."""
    tokens = prompt_tokens + completion_tokens
    cost = busy_seconds / 3600 * hourly_usd
    return UsageRecord(
        job_id=job_id, shard=shard, model=model, quantization=quantization, worker=worker,
        device=device, rows=rows, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, cached_tokens=cached_tokens,
        started_at=started_at, finished_at=finished_at, busy_seconds=busy_seconds,
        tokens_per_second=tokens / busy_seconds if busy_seconds > 0 else 0.0,
        occupancy=batch.occupancy, mean_tokens_per_step=batch.mean_tokens_per_step,
        cost_usd=cost,
        cost_per_million_tokens=cost / tokens * 1e6 if tokens else 0.0,
        weight_bytes=weight_bytes,
    )


def write_usage(store: Store, record: UsageRecord, attempt: int = 0,
                earlier_runs_since: date | None = None) -> str:
    """Write record to its dated key (replacing an earlier try's of the same day); attempt:
    the retry round that ran the shard's rows again (0: its first run).

    earlier_runs_since: the first day an earlier run of the same shard (one that died after
    writing its record) may have finished on; None where no earlier run wrote one. Its
    record on an earlier day is removed, as a same-day one is replaced, so that the shard
    has one record; a daily rollup that counted the removed one is made again.
    """
    day = record.finished_at.date()
    key = keys.usage_key(day, record.job_id, record.shard, attempt)
    row = dataclasses.asdict(record)
    put_table(store, key, pa.Table.from_pylist([row], schema=USAGE_SCHEMA))
    earlier = earlier_runs_since
    while earlier is not None and earlier < day:
        earlier_key = keys.usage_key(earlier, record.job_id, record.shard, attempt)
        if store.exists(earlier_key):
            store.delete(earlier_key)
            if store.exists(rollup.summary_key(earlier)):
                rollup.rollup_usage(store, earlier)
        earlier += timedelta(days=1)
    return key


def job_usage_parts(store: Store, job_id: str, first_day: date,
                    last_day: date) -> dict[tuple[int, int], UsageRecord]:
    """The job's usage records dated first_day..last_day by (shard, attempt): one per
    shard and per retry of its rows.

    A shard re-run on a later day (its first attempt died after writing usage) replaces the
    earlier day's record (write_usage); where both are found (written before it did), the
    later one is kept.
    """
    latest: dict[tuple[int, int], UsageRecord] = {}
    day = first_day
    while day <= last_day:
        for key in store.list(keys.usage_prefix(day, job_id)):
            attempt = keys.part_of_key(key)[1]
            for row in read_table(store, key).to_pylist():
                record = record_from_row(row)
                kept = latest.get((record.shard, attempt))
                if kept is None or record.finished_at > kept.finished_at:
                    latest[(record.shard, attempt)] = record
        day += timedelta(days=1)
    return latest


_RECORD_FIELDS = {f.name for f in dataclasses.fields(UsageRecord)}


def record_from_row(row: dict[str, Any]) -> UsageRecord:
    """A record from a Parquet row, also one an older worker wrote (module docstring)."""
    known = {name: value for name, value in row.items() if name in _RECORD_FIELDS}
    return UsageRecord(**{"occupancy": None, "mean_tokens_per_step": None, **known})


def usage_totals(records: list[UsageRecord]) -> dict[str, float]:
    """The manifest's usage block: sums, with throughput, batch figures and cost over the
    whole job."""
    prompt = sum(r.prompt_tokens for r in records)
    completion = sum(r.completion_tokens for r in records)
    busy = sum(r.busy_seconds for r in records)
    cost = sum(r.cost_usd for r in records)
    tokens = prompt + completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": sum(r.cached_tokens for r in records),
        "busy_seconds": busy,
        "cost_usd": cost,
        "cost_per_million_tokens": cost / tokens * 1e6 if tokens else 0.0,
        "tokens_per_second": tokens / busy if busy > 0 else 0.0,
        "occupancy": _busy_weighted(records, "occupancy"),
        "mean_tokens_per_step": _busy_weighted(records, "mean_tokens_per_step"),
    }


def _busy_weighted(records: list[UsageRecord], name: str) -> float:
    """The mean of a batch figure over the records that have it, weighted by busy time: a
    long shard says more about the job than a short one."""
    measured = [r for r in records if getattr(r, name) is not None]
    busy = sum(r.busy_seconds for r in measured)
    return sum(getattr(r, name) * r.busy_seconds for r in measured) / busy if busy > 0 else 0.0
