"""The job spec: what to run and how (the model, where the prompts are, sampling
defaults, shard size), the submit options derived from its fields, and the sampling
parameters of one row. The input file is checked against it in jobs/input_file.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from engine.structured.params import StructuredOutputsParams
from jobs import keys, limits
from jobs.errors import UserError
from jobs.response_format import parse_response_format, read_response_format_file
from jobs.store import NotFound, Store, get_json, put_json

# Per-row columns that override the spec's sampling defaults when present and not null.
INTEGER_OVERRIDES = ("max_tokens", "n", "top_k", "seed", "logprobs", "prompt_logprobs")
FLOAT_OVERRIDES = ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p")
# stop: a string or a list of strings; response_format: OpenAI's shape as JSON text.
OVERRIDE_COLUMNS = (*INTEGER_OVERRIDES, *FLOAT_OVERRIDES, "stop", "response_format")
# The id column of results and errors when the input names none.
ROW_INDEX_COLUMN = "row_index"
# A row whose input_error is set does not run: it is an invalid row with that reason (a
# converter, such as jobs/openai_requests.py, found it unusable before the job existed).
INPUT_ERROR_COLUMN = "input_error"
RESULT_COLUMNS = ("sample_index", "output", "finish_reason", "prompt_tokens",
                  "completion_tokens", "cached_tokens", "logprobs", "cumulative_logprob",
                  "prompt_logprobs")
ERROR_COLUMN = "error"
# The Celery queue of a job's shards when it names none.
DEFAULT_QUEUE = "batchinfer"


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
    n: int = _option(1, "samples per row (1-128): one result row each, numbered by "
                        "sample_index", int)
    temperature: float = _option(0.0, "sampling temperature, 0 = greedy", float)
    top_p: float = _option(1.0, "nucleus sampling", float)
    top_k: int = _option(-1, "top-k sampling, -1 = off", int)
    seed: int | None = _option(None, "sampling seed, per row (reproducible outputs)", int)
    stop: list[str] | None = _option(None, "stop string (repeatable)")
    logprobs: int | None = _option(
        None, "log-probabilities of each generated token and its K most likely alternatives "
              "(0-20)", int)
    prompt_logprobs: int | None = _option(
        None, "the same for every prompt token after the first (0-20)", int)
    presence_penalty: float = _option(0.0, "OpenAI's presence penalty (-2 to 2)", float)
    frequency_penalty: float = _option(0.0, "OpenAI's frequency penalty (-2 to 2)", float)
    repetition_penalty: float = _option(1.0, "repetition penalty (> 0; 1 = off)", float)
    min_p: float = _option(0.0, "drop tokens less likely than min_p x the most likely (0-1)",
                           float)
    # OpenAI's response_format object: json_schema, json_object, regex, choice or text.
    response_format: dict[str, Any] | None = _option(
        None, "FILE.json with OpenAI's response_format ({\"type\": \"json_schema\", "
              "\"json_schema\": {...}}, regex, choice): every output satisfies it",
        read_response_format_file)
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
            self.shard_size = whole_number("shard_size", self.shard_size)
            if self.shard_size < 1:
                raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
            sampling_params(self, {})
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


def whole_number(name: str, value: Any) -> int:
    """value as an int if it is a whole number (Parquet numeric columns may be floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def sampling_params(spec: JobSpec, overrides: dict[str, Any]) -> SamplingParams:
    """The engine's SamplingParams for one row: spec defaults, then the row's non-null
    override values. Parquet numbers are made ints where whole; the engine's own checks
    then apply, with the job's ceiling on max_tokens. ValueError says what is wrong."""
    values = {name: getattr(spec, name) for name in OVERRIDE_COLUMNS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    kwargs: dict[str, Any] = {}
    for name in INTEGER_OVERRIDES:
        if values[name] is not None:
            kwargs[name] = whole_number(name, values[name])
    for name in FLOAT_OVERRIDES:
        kwargs[name] = finite_number(name, values[name])
    ceiling = limits.max_tokens_limit()
    if kwargs["max_tokens"] > ceiling:
        raise ValueError(f"max_tokens {kwargs['max_tokens']} is over the limit of {ceiling} "
                         f"(BATCHINFER_MAX_TOKENS_LIMIT)")
    stop = values["stop"]
    # An explicitly empty per-row list means "no stop strings" for that row.
    kwargs["stop"] = ([stop] if isinstance(stop, str) else list(stop)) if stop else None
    constraint = (parse_response_format(values["response_format"])
                  if values["response_format"] is not None else None)
    if constraint is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(**constraint)
    return SamplingParams(**kwargs)


def save_spec(store: Store, job_id: str, spec: JobSpec) -> None:
    put_json(store, keys.spec_key(job_id), spec.to_dict())


def load_spec(store: Store, job_id: str) -> JobSpec:
    try:
        return JobSpec.from_dict(get_json(store, keys.spec_key(job_id)))
    except NotFound:
        raise UserError(f"job {job_id} not found in {store.url}") from None
