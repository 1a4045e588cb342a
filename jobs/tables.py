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


# A results part with several samples per input row says in its footer how many input rows
# it answers (its own row count is the samples').
INPUT_ROWS_METADATA = b"batchinfer.input_rows"


def _footer(store: Store, key: str) -> pq.FileMetaData:
    """A Parquet object's footer alone (ranged reads on S3)."""
    with store.open_read(key) as file:
        return pq.read_metadata(file)


def count_rows(store: Store, key: str) -> int:
    """Rows in a Parquet object, from its footer."""
    return _footer(store, key).num_rows


def count_input_rows(store: Store, key: str) -> int:
    """Input rows a results part answers, from its footer."""
    footer = _footer(store, key)
    metadata = footer.metadata or {}
    return int(metadata[INPUT_ROWS_METADATA]) if INPUT_ROWS_METADATA in metadata else footer.num_rows
