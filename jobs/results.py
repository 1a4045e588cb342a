"""A job's results: its per-shard part files, merged in shard order (which is input order).

A shard whose failed rows were run again by a retry round has more than one part
(jobs/outcomes.py); its rows are put back in input order when the parts are merged.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import keys
from jobs.errors import UserError
from jobs.input_file import input_layout
from jobs.manifest import load_manifest
from jobs.outcomes import (
    ERROR_COLUMN,
    ERROR_KIND_COLUMN,
    ShardOutcome,
    list_outcomes,
    merge_errors,
)
from jobs.planner import plan_shards
from jobs.shard_input import read_shard_rows
from jobs.spec import ROW_INDEX_COLUMN, load_spec
from jobs.store import Store
from jobs.tables import read_table


def _finished(store: Store, job_id: str) -> list[ShardOutcome]:
    load_manifest(store, job_id)  # an unknown job is "not found", as everywhere
    return [o for _, o in sorted(list_outcomes(store, job_id).items()) if o.done]


def _check_has_results(store: Store, job_id: str) -> None:
    if not _finished(store, job_id):
        raise UserError(f"job {job_id} has no results yet")


def shard_tables(store: Store, job_id: str) -> Iterator[pa.Table]:
    """Each finished shard's result rows, one table per shard, in input order (less the
    parts' footer metadata, which describes a part, not the merged whole); none while no
    shard has finished."""
    for outcome in _finished(store, job_id):
        parts = [read_table(store, outcome.results[a]).replace_schema_metadata()
                 for a in sorted(outcome.results)]
        if len(parts) == 1:
            yield parts[0]
        else:
            yield _in_input_order(store, job_id, outcome.shard, pa.concat_tables(parts))


def _in_input_order(store: Store, job_id: str, shard_index: int, table: pa.Table) -> pa.Table:
    """Sort a retried shard's rows by their place in the input (read from the input's id
    column when the job has one; row numbers are their own place)."""
    ids = table.column(0).to_pylist()
    spec = load_spec(store, job_id)
    if spec.id_column is None:
        order = ids
    else:
        with store.open_read(keys.input_key(job_id)) as file:
            parquet = pq.ParquetFile(file)
            layout = input_layout(parquet.schema_arrow, spec)
            shard = plan_shards(parquet.metadata, spec.shard_size)[shard_index]
            input_ids = read_shard_rows(parquet, shard).column(layout.id_column).to_pylist()
        place = {value: position for position, value in enumerate(input_ids)}
        order = [place[value] for value in ids]
    return table.take(pa.array(sorted(range(len(ids)), key=order.__getitem__), pa.int64()))


def merge_results(store: Store, job_id: str) -> pa.Table:
    """Every finished shard's result rows in one table, in input order."""
    _check_has_results(store, job_id)
    return pa.concat_tables(list(shard_tables(store, job_id)))


def write_results_file(store: Store, job_id: str, out_path: str | Path) -> int:
    """Write the merged results to a local Parquet file, one shard in memory at a time.

    The file appears whole or not at all. Returns the number of rows written.
    """
    _check_has_results(store, job_id)
    return write_tables_file(shard_tables(store, job_id), out_path)


def errors_table(store: Store, job_id: str) -> pa.Table:
    """The job's failed rows (id, error, error_kind) in input order; no rows if none."""
    load_manifest(store, job_id)
    table = merge_errors(store, job_id)
    if table is not None:
        return table
    id_column = load_spec(store, job_id).id_column or ROW_INDEX_COLUMN
    return pa.table({id_column: pa.array([], pa.string()),
                     ERROR_COLUMN: pa.array([], pa.string()),
                     ERROR_KIND_COLUMN: pa.array([], pa.string())})


@contextmanager
def local_file_atomically(out_path: str | Path) -> Iterator[Path]:
    """A temporary path beside out_path to write; it becomes out_path when the block ends
    without an error, so the file appears whole or not at all."""
    out = Path(out_path)
    temp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield temp
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)


def write_tables_file(tables: Iterable[pa.Table], out_path: str | Path) -> int:
    """Write tables of one schema to a local Parquet file that appears whole or not at all;
    returns the number of rows written."""
    tables = iter(tables)
    first = next(tables)
    rows = 0
    with local_file_atomically(out_path) as temp, pq.ParquetWriter(temp, first.schema) as writer:
        for part in itertools.chain([first], tables):
            writer.write_table(part)
            rows += part.num_rows
    return rows
