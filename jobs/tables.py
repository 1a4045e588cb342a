"""Parquet objects in the store: whole small tables in and out, and row counts from footers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.store import Store


def put_table(store: Store, key: str, table: pa.Table) -> None:
    """Write table as one Parquet object, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.put_bytes(key, sink.getvalue().to_pybytes())


def read_table(store: Store, key: str) -> pa.Table:
    """A whole Parquet object (one GET: parts and records are read in full anyway)."""
    return pq.read_table(pa.BufferReader(store.get_bytes(key)))


def count_rows(store: Store, key: str) -> int:
    """Rows in a Parquet object, from its footer alone (ranged reads on S3)."""
    with store.open_read(key) as file:
        return pq.read_metadata(file).num_rows
