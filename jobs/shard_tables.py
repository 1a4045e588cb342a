"""The tables a shard run writes: its results part and its errors part.

One place for the results schema (documented in the README): the id, the passed-through
columns, then what the engine produced for each row.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from engine import RequestOutput
from jobs.outcomes import ERROR_COLUMN, ERROR_KIND_COLUMN, ErrorKind


def results_table(id_column: str, ids: pa.Array | pa.ChunkedArray,
                  passthrough: dict[str, pa.ChunkedArray],
                  outputs: Sequence[RequestOutput]) -> pa.Table:
    """One row per output, in the order given (the rows' input order)."""
    columns = {id_column: ids, **passthrough}
    columns.update(
        output=pa.array([o.text for o in outputs], pa.string()),
        finish_reason=pa.array([o.finish_reason for o in outputs], pa.string()),
        prompt_tokens=pa.array([o.prompt_tokens for o in outputs], pa.int64()),
        completion_tokens=pa.array([o.completion_tokens for o in outputs], pa.int64()),
        cached_tokens=pa.array([o.cached_tokens for o in outputs], pa.int64()),
    )
    return pa.table(columns)


def errors_table(id_column: str, ids: pa.Array | pa.ChunkedArray,
                 errors: Sequence[tuple[str, ErrorKind]]) -> pa.Table:
    """One row per failed row: its id, the reason and the kind."""
    return pa.table({
        id_column: ids,
        ERROR_COLUMN: pa.array([reason for reason, _ in errors], pa.string()),
        ERROR_KIND_COLUMN: pa.array([kind for _, kind in errors], pa.string()),
    })
