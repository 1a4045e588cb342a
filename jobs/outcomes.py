"""What became of each row of a job, from the part files its shards left in the store.

A shard's first run (attempt 0) writes `errors/part-NNNNN.parquet` (rows that could not
run, with the reason and its kind), then `results/part-NNNNN.parquet` (the rows that ran).
A retry round R reruns a finished shard's rows that failed for a transient reason into
`errors/part-NNNNN-rRRR.parquet` and `results/part-NNNNN-rRRR.parquet`. An attempt counts
only once its results part exists (written last), so a crashed attempt's errors part is
ignored. A row's fate is its latest counted attempt's: a retried row that succeeded is in
that attempt's results part and no longer failed; a row is never in two results parts.

Error kinds: "invalid" (the row itself cannot run: no prompt, too long, a bad override;
running it again gives the same answer) and "transient" (the engine failed on it at run
time, e.g. out of memory even alone: `batchinfer retry` runs it again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import pyarrow as pa

from jobs import keys
from jobs.spec import ERROR_COLUMN
from jobs.store import Store
from jobs.tables import count_input_rows, count_rows, read_table

ERROR_KIND_COLUMN = "error_kind"


class ErrorKind(StrEnum):
    """Why a row failed, as its error_kind column says (module docstring)."""

    INVALID = "invalid"
    TRANSIENT = "transient"


@dataclass
class ShardOutcome:
    """The counted attempts of one shard: attempt -> key (0 is the first run)."""

    shard: int
    results: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # only of counted attempts

    @property
    def done(self) -> bool:
        """The shard's first run finished (every row has run or has an error record)."""
        return 0 in self.results

    @property
    def retried(self) -> bool:
        return any(attempt > 0 for attempt in self.results)


def list_outcomes(store: Store, job_id: str) -> dict[int, ShardOutcome]:
    """Every shard that has a results part of any attempt, by shard index."""
    outcomes: dict[int, ShardOutcome] = {}
    for key in store.list(keys.results_prefix(job_id)):
        shard, attempt = keys.part_of_key(key)
        outcomes.setdefault(shard, ShardOutcome(shard)).results[attempt] = key
    for key in store.list(keys.errors_prefix(job_id)):
        shard, attempt = keys.part_of_key(key)
        outcome = outcomes.get(shard)
        if outcome is not None and attempt in outcome.results:
            outcome.errors[attempt] = key
    return outcomes


def _with_kind(table: pa.Table) -> pa.Table:
    """Error parts written before kinds existed hold only invalid rows."""
    if ERROR_KIND_COLUMN in table.column_names:
        return table
    return table.append_column(ERROR_KIND_COLUMN,
                               pa.array([ErrorKind.INVALID] * table.num_rows, pa.string()))


def failed_rows(store: Store, outcome: ShardOutcome, before: int | None = None) -> pa.Table | None:
    """The shard's rows that are failed now: (id, error, error_kind), in input order within
    each attempt; None if none. before: only attempts below it (what retry round `before`
    starts from)."""
    attempts = sorted(a for a in outcome.results if before is None or a < before)
    if attempts == [0]:
        if 0 not in outcome.errors:
            return None
        return _with_kind(read_table(store, outcome.errors[0]))
    failed: dict = {}  # id -> row
    schema = None
    for attempt in attempts:
        if attempt > 0:  # its results part holds only rows that were failed before
            for row_id in read_table(store, outcome.results[attempt]).column(0).to_pylist():
                failed.pop(row_id, None)
        if attempt in outcome.errors:
            table = _with_kind(read_table(store, outcome.errors[attempt]))
            schema = schema or table.schema
            for row in table.to_pylist():
                failed[row[table.column_names[0]]] = row
    if not failed or schema is None:
        return None
    return pa.Table.from_pylist(list(failed.values()), schema=schema)


def count_failed(store: Store, outcome: ShardOutcome) -> int:
    """Rows of the shard failed now (from the footer alone when it was never retried)."""
    if not outcome.retried:
        return count_rows(store, outcome.errors[0]) if 0 in outcome.errors else 0
    table = failed_rows(store, outcome)
    return 0 if table is None else table.num_rows


def count_succeeded(store: Store, outcome: ShardOutcome) -> int:
    """Input rows of the shard that succeeded (however many samples each)."""
    return sum(count_input_rows(store, key) for key in outcome.results.values())


def transient_ids(store: Store, outcome: ShardOutcome, before: int | None = None) -> list:
    """Ids of the shard's rows that failed for a transient reason and have not run since."""
    table = failed_rows(store, outcome, before)
    if table is None:
        return []
    return [row[table.column_names[0]] for row in table.to_pylist()
            if row[ERROR_KIND_COLUMN] == ErrorKind.TRANSIENT]


def merge_errors(store: Store, job_id: str) -> pa.Table | None:
    """The rows of the job that are failed now, in shard order; None if there are none."""
    tables = []
    outcomes = list_outcomes(store, job_id)
    for shard in sorted(outcomes):
        if outcomes[shard].done:
            table = failed_rows(store, outcomes[shard])
            if table is not None and table.num_rows:
                tables.append(table)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


__all__ = ["ERROR_COLUMN", "ERROR_KIND_COLUMN", "ErrorKind", "ShardOutcome", "count_failed",
           "count_succeeded", "failed_rows", "list_outcomes", "merge_errors", "transient_ids"]
