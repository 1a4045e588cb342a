"""The job spec (what to run and how) and validation of an input Parquet file against it.

Validation reads the footer and the schema, and of the data only the id column (to check
that ids are unique); prompts themselves are checked row by row when a shard runs, so a
bad row becomes an error record instead of failing the job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import keys, limits
from jobs.errors import UserError
from jobs.store import NotFound, Store, get_json, put_json

# Per-row columns that override the spec's sampling defaults when present and not null.
INTEGER_OVERRIDES = ("max_tokens", "top_k", "seed")
FLOAT_OVERRIDES = ("temperature", "top_p")
OVERRIDE_COLUMNS = (*INTEGER_OVERRIDES, *FLOAT_OVERRIDES, "stop")
# The id column of results and errors when the input names none.
ROW_INDEX_COLUMN = "row_index"
RESULT_COLUMNS = ("output", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens")
ERROR_COLUMN = "error"
# The Celery queue of a job's shards when it names none.
DEFAULT_QUEUE = "batchinfer"
_ID_BATCH_ROWS = 64 * 1024


def _option(default: Any, help: str, parse: Callable[[str], Any] = str) -> Any:
    """A spec field that a submit sets: the CLI flag, the inbox's BATCHINFER_INBOX_<NAME>
    variable and the Python client's keyword all come from it (spec_options())."""
    return field(default=default, metadata={"help": help, "parse": parse})


@dataclass
class JobSpec:
    """What a job runs: the model, where the prompts are, sampling defaults, shard size."""

    model: str = field(metadata={"help": "model name from BATCHINFER_MODELS, or a local "
                                         "Hugging Face folder", "parse": str})
    prompt_column: str = _option("prompt", "text column")
    # When set, rows are chats and prompt_column is unused.
    messages_column: str | None = _option(
        None, "column of chat messages (list of {role, content}), rendered with the model's "
              "chat template")
    id_column: str | None = _option(None, "unique row id column (default: the row index)")
    max_tokens: int = _option(256, "tokens to generate per row", int)
    temperature: float = _option(0.0, "sampling temperature, 0 = greedy", float)
    top_p: float = _option(1.0, "nucleus sampling", float)
    top_k: int = _option(-1, "top-k sampling, -1 = off", int)
    seed: int | None = _option(None, "sampling seed, per row (reproducible outputs)", int)
    stop: list[str] | None = _option(None, "stop string (repeatable)")
    shard_size: int = _option(1000, "rows per shard", int)
    queue: str | None = _option(None, "Celery queue for this job's shards (route by model)")
    idempotency_key: str | None = _option(None, "a key already used returns the existing job")

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_text("model", self.model)
        _check_text("prompt_column", self.prompt_column)
        for name in ("messages_column", "id_column", "queue", "idempotency_key"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
        if self.stop is not None:
            if not isinstance(self.stop, list):
                raise UserError(f"stop must be a string or a list of strings, got {self.stop!r}")
            for text in self.stop:
                _check_text("stop", text)
        try:
            self.shard_size = _integer("shard_size", self.shard_size)
            if self.shard_size < 1:
                raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
            sampling_kwargs(self, {})
        except ValueError as error:
            raise UserError(str(error)) from None

    @property
    def text_column(self) -> str:
        """The column the prompts come from."""
        return self.messages_column or self.prompt_column

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JobSpec:
        """A spec from JSON (spec.json, an inbox NAME.spec.json); UserError on unknown keys."""
        if not isinstance(values, dict):
            raise UserError(f"a job spec must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown job spec field(s): {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
        if "model" not in values:
            raise UserError("a job spec needs a model")
        return cls(**values)


@dataclass(frozen=True)
class SpecOption:
    """One setting of a submit, as the CLI, the inbox and the client name it."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]  # from the text of a flag or an environment variable

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"


def spec_options() -> list[SpecOption]:
    """Every JobSpec field, in order: what `batchinfer submit` takes as flags."""
    return [SpecOption(f.name, None if f.default is MISSING else f.default, f.metadata["help"],
                       f.metadata["parse"]) for f in dataclasses.fields(JobSpec)]


def setting_name(name: str) -> str:
    """A spec field as both its callers know it: the Python client and inbox specs by the
    field's name, the command line by its flag."""
    return f"{name} (--{name.replace('_', '-')})"


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} must be a non-empty string, got {value!r}")


def _integer(name: str, value: Any) -> int:
    """value as an int if it is a whole number (Parquet numeric columns may be floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def sampling_kwargs(spec: JobSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """The engine's SamplingParams arguments for one row: spec defaults, then the row's
    non-null override values. ValueError says what is wrong with a value."""
    values = {name: getattr(spec, name) for name in OVERRIDE_COLUMNS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    kwargs: dict[str, Any] = {}
    for name in INTEGER_OVERRIDES:
        if values[name] is not None:
            kwargs[name] = _integer(name, values[name])
    for name in FLOAT_OVERRIDES:
        kwargs[name] = _number(name, values[name])
    if kwargs["max_tokens"] < 1:
        raise ValueError(f"max_tokens must be at least 1, got {kwargs['max_tokens']}")
    ceiling = limits.max_tokens_limit()
    if kwargs["max_tokens"] > ceiling:
        raise ValueError(f"max_tokens {kwargs['max_tokens']} is over the limit of {ceiling} "
                         f"(BATCHINFER_MAX_TOKENS_LIMIT)")
    if kwargs["temperature"] < 0:
        raise ValueError(f"temperature must be >= 0, got {kwargs['temperature']}")
    if not 0 < kwargs["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {kwargs['top_p']}")
    if kwargs["top_k"] < -1:
        raise ValueError(f"top_k must be -1 (off) or positive, got {kwargs['top_k']}")
    stop = values["stop"]
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    # An explicitly empty per-row list means "no stop strings" for that row.
    kwargs["stop"] = list(stop) if stop else None
    return kwargs


def save_spec(store: Store, job_id: str, spec: JobSpec) -> None:
    put_json(store, keys.spec_key(job_id), spec.to_dict())


def load_spec(store: Store, job_id: str) -> JobSpec:
    try:
        return JobSpec.from_dict(get_json(store, keys.spec_key(job_id)))
    except NotFound:
        raise UserError(f"job {job_id} not found in {store.url}") from None


# --- input validation -------------------------------------------------------------------


@dataclass(frozen=True)
class InputLayout:
    """How a job reads its input's columns (derived from the schema alone)."""

    text_column: str
    is_messages: bool
    id_column: str | None  # None: rows are identified by their index in the file
    override_columns: tuple[str, ...]
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
        if name == "stop":
            if not (_is_string(column_type) or (_is_list(column_type)
                                                and _is_string(column_type.value_type))):
                raise UserError(f"column 'stop' (per-row stop strings) must be string or "
                                f"list<string>, got {column_type}")
        elif not _is_numeric(column_type):
            raise UserError(f"column {name!r} (per-row {name}) must be numeric, got {column_type}")

    passthrough = tuple(n for n in names if n not in (text, id_column))
    clashes = [n for n in passthrough if n in RESULT_COLUMNS]
    if clashes:
        raise UserError(f"input column(s) {', '.join(clashes)} would clash with result columns "
                        f"({', '.join(RESULT_COLUMNS)}); rename them")
    return InputLayout(text_column=text, is_messages=bool(spec.messages_column),
                       id_column=id_column, override_columns=overrides,
                       passthrough_columns=passthrough)


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
