"""A job's results: its per-shard part files, merged in shard order (which is input order)."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import keys
from jobs.errors import UserError
from jobs.store import Store
from jobs.tables import read_table


def _part_keys(store: Store, job_id: str) -> list[str]:
    # Zero-padded shard numbers make the sorted listing the shard order.
    part_keys = store.list(keys.results_prefix(job_id))
    if not part_keys:
        raise UserError(f"job {job_id} has no results yet")
    return part_keys


def merge_results(store: Store, job_id: str) -> pa.Table:
    """Every finished shard's result rows in one table, in input order."""
    return pa.concat_tables([read_table(store, key) for key in _part_keys(store, job_id)])


def write_results_file(store: Store, job_id: str, out_path: str | Path) -> int:
    """Write the merged results to a local Parquet file, one part in memory at a time.

    The file appears whole or not at all. Returns the number of rows written.
    """
    part_keys = _part_keys(store, job_id)
    first = read_table(store, part_keys[0])
    out = Path(out_path)
    temp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    rows = 0
    try:
        with pq.ParquetWriter(temp, first.schema) as writer:
            parts = itertools.chain([first], (read_table(store, key) for key in part_keys[1:]))
            for part in parts:
                writer.write_table(part)
                rows += part.num_rows
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return rows
