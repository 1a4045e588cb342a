"""A shard's rows read from the job's input, and what each row asks of the engine.

Nothing here needs the engine: reading results (which puts a retried shard's rows back in
input order) reads rows the same way the runner does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.sampling_params import SamplingParams
from jobs.input_file import InputLayout
from jobs.planner import Shard, row_group_bounds
from jobs.spec import JobSpec, sampling_params

READ_BATCH_ROWS = 1024


def read_shard_rows(parquet: pq.ParquetFile, shard: Shard) -> pa.Table:
    """The shard's rows, reading only the row groups that hold them, in batches."""
    bounds = row_group_bounds(parquet.metadata)
    groups = [i for i, (start, end) in enumerate(bounds)
              if start < shard.row_end and end > shard.row_start]
    position = bounds[groups[0]][0]  # file row of the next batch's first row
    pieces = []
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups):
        first = max(shard.row_start - position, 0)
        last = min(shard.row_end - position, batch.num_rows)
        if last > first:
            pieces.append(batch.slice(first, last - first))
        position += batch.num_rows
        if position >= shard.row_end:
            break
    return pa.Table.from_batches(pieces, schema=parquet.schema_arrow)


def select_rows(rows: pa.Table, row_numbers: pa.Array, layout: InputLayout,
                ids: list) -> tuple[pa.Table, pa.Array]:
    """The rows (and their file row numbers) whose result id is in ids."""
    values = (rows.column(layout.id_column) if layout.id_column is not None
              else row_numbers).to_pylist()
    wanted = set(ids)
    mask = pa.array([value in wanted for value in values], pa.bool_())
    return rows.filter(mask), row_numbers.filter(mask)


def _check_length(chars: int, limit: int) -> None:
    if chars > limit:
        raise ValueError(f"prompt has {chars} characters, more than the limit of {limit} "
                         f"(BATCHINFER_MAX_PROMPT_CHARS)")


def prompt_text(value: Any, layout: InputLayout, tokenizer: Any, max_chars: int) -> str:
    """The prompt for one row's text or messages value; ValueError says why there is none.

    The length limit is checked before tokenizing: a huge prompt costs nothing to refuse."""
    if not layout.is_messages:
        if value is None:
            raise ValueError("prompt is null")
        if not value:
            raise ValueError("prompt is empty")
        _check_length(len(value), max_chars)
        return value
    if not value:
        raise ValueError("messages are null or empty")
    for number, message in enumerate(value):
        if message is None or not message.get("role") or message.get("content") is None:
            raise ValueError(f"message {number} has no role or no content")
    _check_length(sum(len(m["content"]) for m in value), max_chars)
    try:
        return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # the template is the model's code: any failure is this row's
        raise ValueError(f"chat template failed: {error}") from None


# (position in the shard, prompt, sampling parameters, error): error is set, and the
# others None, when the row cannot run.
RowRequest = tuple[int, str | None, SamplingParams | None, str | None]


def row_requests(rows: pa.Table, layout: InputLayout, spec: JobSpec, tokenizer: Any,
                 max_chars: int) -> Iterator[RowRequest]:
    """What each row asks of the engine, in order, read a batch of rows at a time."""
    position = 0
    for batch in rows.to_batches(max_chunksize=READ_BATCH_ROWS):
        texts = batch.column(layout.text_column).to_pylist()
        overrides = {name: batch.column(name).to_pylist() for name in layout.override_columns}
        errors = (batch.column(layout.error_column).to_pylist() if layout.error_column
                  else [None] * batch.num_rows)
        for offset, (text, error) in enumerate(zip(texts, errors, strict=True)):
            if error is not None:
                yield position, None, None, error
            else:
                row_values = {name: values[offset] for name, values in overrides.items()}
                yield (position, *_prepare(text, row_values, layout, spec, tokenizer, max_chars))
            position += 1


def _prepare(text: Any, overrides: dict[str, Any], layout: InputLayout, spec: JobSpec,
             tokenizer: Any, max_chars: int
             ) -> tuple[str | None, SamplingParams | None, str | None]:
    try:
        prompt = prompt_text(text, layout, tokenizer, max_chars)
    except ValueError as error:
        return None, None, str(error)
    try:
        return prompt, sampling_params(spec, overrides), None
    except ValueError as error:
        return None, None, f"invalid sampling override: {error}"
