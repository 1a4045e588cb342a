"""The tables a shard run writes: its results part and its errors part.

One place for the results schema (documented in the README): the id, the passed-through
columns, then what the engine produced for each row; with several samples asked for (by
the job or any row), one row per sample, numbered by `sample_index`, the id, the
passed-through columns, prompt_tokens and cached_tokens repeated on each (the prompt ran
once: usage counts it once); with log-probabilities asked for
(by the job or any row), `logprobs` and `cumulative_logprob`, and `prompt_logprobs`:
per token, the sampled (or prompt) token with its log-probability and `top`, the most
likely tokens at that position (the token itself among them where it ranks), most
likely first. Rows that did not ask hold nulls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from engine.outputs import Logprob, RequestOutput
from jobs.outcomes import ERROR_COLUMN, ERROR_KIND_COLUMN, ErrorKind
from jobs.tables import INPUT_ROWS_METADATA

LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()),
                     ("logprob", pa.float32())])
TOKEN_LOGPROBS = pa.list_(pa.struct([*LOGPROB, ("top", pa.list_(LOGPROB))]))


def results_part(id_column: str, ids: pa.Array | pa.ChunkedArray,
                 passthrough: dict[str, pa.ChunkedArray], outputs: Sequence[RequestOutput],
                 *, samples: bool = False, logprobs: bool = False,
                 prompt_logprobs: bool = False) -> pa.Table:
    """One row per output, in the order given (the rows' input order), or with samples one
    row per sample in sample order; logprobs / prompt_logprobs: add those columns (the job
    asked for them somewhere)."""
    if samples:
        owners = pa.array([row for row, o in enumerate(outputs) for _ in o.outputs], pa.int64())
        ids = ids.take(owners)
        passthrough = {name: column.take(owners) for name, column in passthrough.items()}
        completions = [(o, sample) for o in outputs for sample in o.outputs]
    else:
        completions = [(o, o.outputs[0]) for o in outputs]
    columns = {id_column: ids, **passthrough}
    if samples:
        columns["sample_index"] = pa.array([s.index for _, s in completions], pa.int32())
    columns.update(
        output=pa.array([s.text for _, s in completions], pa.string()),
        finish_reason=pa.array([s.finish_reason for _, s in completions], pa.string()),
        prompt_tokens=pa.array([o.prompt_tokens for o, _ in completions], pa.int64()),
        completion_tokens=pa.array([len(s.token_ids) for _, s in completions], pa.int64()),
        cached_tokens=pa.array([o.cached_tokens for o, _ in completions], pa.int64()),
    )
    if logprobs:
        columns["logprobs"] = pa.array(
            [_positions(s.token_ids, s.logprobs) for _, s in completions], TOKEN_LOGPROBS)
        columns["cumulative_logprob"] = pa.array([s.cumulative_logprob for _, s in completions],
                                                 pa.float64())
    if prompt_logprobs:
        columns["prompt_logprobs"] = pa.array(
            [_positions(o.prompt_token_ids[1:], (o.prompt_logprobs or [None])[1:])
             if o.prompt_logprobs is not None else None for o, _ in completions],
            TOKEN_LOGPROBS)
    table = pa.table(columns)
    if samples:
        table = table.replace_schema_metadata({INPUT_ROWS_METADATA: str(len(outputs))})
    return table


def _positions(token_ids: Sequence[int], per_position: Sequence[dict[int, Logprob]] | None
               ) -> list[dict[str, Any]] | None:
    """Per position: the token that stands there, its log-probability and the top list."""
    if per_position is None:
        return None
    rows = []
    for token_id, entries in zip(token_ids, per_position, strict=True):
        ranked = sorted(entries.items(), key=lambda item: item[1].rank or 0)
        rows.append({**_entry(token_id, entries[token_id]),
                     "top": [_entry(t, lp) for t, lp in ranked]})
    return rows


def _entry(token_id: int, logprob: Logprob) -> dict[str, Any]:
    return {"token_id": token_id, "token": logprob.decoded_token, "logprob": logprob.logprob}


def errors_part(id_column: str, ids: pa.Array | pa.ChunkedArray,
                 errors: Sequence[tuple[str, ErrorKind]]) -> pa.Table:
    """One row per failed row: its id, the reason and the kind."""
    return pa.table({
        id_column: ids,
        ERROR_COLUMN: pa.array([reason for reason, _ in errors], pa.string()),
        ERROR_KIND_COLUMN: pa.array([kind for _, kind in errors], pa.string()),
    })
