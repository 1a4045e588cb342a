"""An input Parquet file checked against a job spec, before anything is uploaded.

Validation reads the footer and the schema, and of the data only the id column (to check
that ids are unique); prompts themselves are checked row by row when a shard runs, so a
bad row becomes an error record instead of failing the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import limits
from jobs.errors import UserError
from jobs.spec import (
    INPUT_ERROR_COLUMN,
    OVERRIDE_COLUMNS,
    RESULT_COLUMNS,
    ROW_INDEX_COLUMN,
    JobSpec,
    setting_name,
)

_ID_BATCH_ROWS = 64 * 1024


@dataclass(frozen=True)
class InputLayout:
    """How a job reads its input's columns (derived from the schema alone)."""

    text_column: str
    is_messages: bool
    id_column: str | None  # None: rows are identified by their index in the file
    override_columns: tuple[str, ...]
    error_column: str | None  # INPUT_ERROR_COLUMN where the input has it
    passthrough_columns: tuple[str, ...]  # copied to results: all but the text and id columns

    @property
    def result_id_column(self) -> str:
        return self.id_column or ROW_INDEX_COLUMN


@dataclass(frozen=True)
class InputInfo:
    layout: InputLayout
    num_rows: int
    metadata: pq.FileMetaData


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t))


def _is_messages(t: pa.DataType) -> bool:
    if not _is_list(t) or not pa.types.is_struct(t.value_type):
        return False
    struct = t.value_type
    return all(struct.get_field_index(name) >= 0 and _is_string(struct.field(name).type)
               for name in ("role", "content"))


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def input_layout(schema: pa.Schema, spec: JobSpec) -> InputLayout:
    """Check the input's columns against the spec; UserError names the first problem."""
    names = list(schema.names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"input has duplicate column names: {', '.join(duplicates)}")
    listing = ", ".join(names)
    text = spec.text_column
    if text not in names:
        setting = setting_name("messages_column" if spec.messages_column else "prompt_column")
        raise UserError(f"input has no column {text!r} (columns: {listing}); "
                        f"name the right one with {setting}")
    text_type = schema.field(text).type
    if spec.messages_column:
        if not _is_messages(text_type):
            raise UserError(f"messages column {text!r} must be a list of "
                            f"{{role: string, content: string}}, got {text_type}")
    elif not _is_string(text_type):
        raise UserError(f"prompt column {text!r} must be of type string, got {text_type}")

    id_column = spec.id_column
    if id_column is not None:
        if id_column not in names:
            raise UserError(f"input has no id column {id_column!r} (columns: {listing})")
        if id_column == text:
            raise UserError(f"the id column cannot be the prompt column {text!r}")
        id_type = schema.field(id_column).type
        if not (pa.types.is_integer(id_type) or _is_string(id_type)):
            raise UserError(f"id column {id_column!r} must be integer or string, got {id_type}")
    elif ROW_INDEX_COLUMN in names:
        raise UserError(f"input has a column named {ROW_INDEX_COLUMN!r}, the name results use "
                        f"for row numbers; set {setting_name('id_column')} to "
                        f"{ROW_INDEX_COLUMN!r} or rename it")

    overrides = tuple(n for n in OVERRIDE_COLUMNS if n in names and n != text)
    for name in overrides:
        column_type = schema.field(name).type
        if name == "response_format":
            if not _is_string(column_type):
                raise UserError(f"column 'response_format' (per-row response format, OpenAI's "
                                f"JSON as text) must be string, got {column_type}")
        elif name == "stop":
            if not (_is_string(column_type) or (_is_list(column_type)
                                                and _is_string(column_type.value_type))):
                raise UserError(f"column 'stop' (per-row stop strings) must be string or "
                                f"list<string>, got {column_type}")
        elif not _is_numeric(column_type):
            raise UserError(f"column {name!r} (per-row {name}) must be numeric, got {column_type}")

    error_column = INPUT_ERROR_COLUMN if INPUT_ERROR_COLUMN in names else None
    if error_column and not _is_string(schema.field(error_column).type):
        raise UserError(f"column {error_column!r} (a reason the row cannot run) must be "
                        f"string, got {schema.field(error_column).type}")
    # A per-row logprobs (or prompt_logprobs) count is consumed: its name is a result column.
    passthrough = tuple(n for n in names if n not in (text, id_column, error_column)
                        and not (n in overrides and n in RESULT_COLUMNS))
    clashes = [n for n in passthrough if n in RESULT_COLUMNS]
    if clashes:
        raise UserError(f"input column(s) {', '.join(clashes)} would clash with result columns "
                        f"({', '.join(RESULT_COLUMNS)}); rename them")
    return InputLayout(text_column=text, is_messages=bool(spec.messages_column),
                       id_column=id_column, override_columns=overrides,
                       error_column=error_column, passthrough_columns=passthrough)


def _open_parquet(source: str | Path | BinaryIO) -> pq.ParquetFile:
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "input")
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        raise UserError(f"input {name} is a folder, not a Parquet file")
    try:
        return pq.ParquetFile(source)
    except FileNotFoundError:
        raise UserError(f"input file not found: {name}") from None
    except pa.ArrowInvalid:
        raise UserError(f"input {name} is not a Parquet file") from None
    except OSError as error:  # unreadable: permissions, a broken mount
        raise UserError(f"cannot read input {name}: {error}") from None


def _check_unique_ids(parquet: pq.ParquetFile, column: str) -> None:
    # Only the id column is read, in batches; Arrow holds it far more compactly than Python.
    batches = [b.column(0) for b in parquet.iter_batches(batch_size=_ID_BATCH_ROWS,
                                                         columns=[column])]
    ids = pa.chunked_array(batches)
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise UserError(f"id column {column!r} has an empty (null) value at row {row}")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise UserError(f"id column {column!r} is not unique: {repeated!r} appears more than once")


def _input_size(source: str | Path | BinaryIO) -> int | None:
    if isinstance(source, (str, Path)):
        try:
            return Path(source).stat().st_size
        except OSError:
            return None  # _open_parquet says what is wrong with it
    try:
        position = source.tell()
        size = source.seek(0, 2)
        source.seek(position)
        return size
    except (AttributeError, OSError):
        return None


def validate_input(source: str | Path | BinaryIO, spec: JobSpec) -> InputInfo:
    """Check that source is a Parquet file the spec can run, within the limits
    (jobs/limits.py); UserError if not."""
    size = _input_size(source)
    if size is not None:
        limits.check_input_size(size)
    parquet = _open_parquet(source)
    layout = input_layout(parquet.schema_arrow, spec)
    num_rows = parquet.metadata.num_rows
    if num_rows == 0:
        raise UserError("input has no rows")
    limits.check_input_rows(num_rows)
    if layout.id_column is not None:
        _check_unique_ids(parquet, layout.id_column)
    return InputInfo(layout=layout, num_rows=num_rows, metadata=parquet.metadata)
