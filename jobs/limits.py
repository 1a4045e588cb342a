"""Limits on what a job may ask for, from the environment, with generous defaults.

  BATCHINFER_MAX_INPUT_BYTES    50 GiB        an input file larger than this is refused at submit
  BATCHINFER_MAX_INPUT_ROWS     100,000,000   an input with more rows is refused at submit
  BATCHINFER_MAX_TOKENS_LIMIT   32768         the highest max_tokens a job (or a row) may ask for
  BATCHINFER_MAX_PROMPT_CHARS   1,000,000     a longer prompt (text, or all messages' content)
                                              becomes an error row, like one over the context

The submit-time limits are UserErrors raised before anything is uploaded or queued; the
per-row ones make that row an error record (kind "invalid") and the job goes on. Each is
read when used, so the submitting machine and the workers apply their own settings.
"""

from __future__ import annotations

from jobs.errors import UserError
from jobs.settings import env_whole_number

GIB = 1024**3
DEFAULTS = {
    "BATCHINFER_MAX_INPUT_BYTES": 50 * GIB,
    "BATCHINFER_MAX_INPUT_ROWS": 100_000_000,
    "BATCHINFER_MAX_TOKENS_LIMIT": 32768,
    "BATCHINFER_MAX_PROMPT_CHARS": 1_000_000,
}


def _positive_int(variable: str) -> int:
    return env_whole_number(variable, DEFAULTS[variable], minimum=1)


def max_input_bytes() -> int:
    return _positive_int("BATCHINFER_MAX_INPUT_BYTES")


def max_input_rows() -> int:
    return _positive_int("BATCHINFER_MAX_INPUT_ROWS")


def max_tokens_limit() -> int:
    return _positive_int("BATCHINFER_MAX_TOKENS_LIMIT")


def max_prompt_chars() -> int:
    return _positive_int("BATCHINFER_MAX_PROMPT_CHARS")


def _size(count: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def check_input_size(num_bytes: int) -> None:
    limit = max_input_bytes()
    if num_bytes > limit:
        raise UserError(f"input is {_size(num_bytes)}, more than the limit of {_size(limit)} "
                        f"(BATCHINFER_MAX_INPUT_BYTES); split it into several jobs")


def check_input_rows(num_rows: int) -> None:
    limit = max_input_rows()
    if num_rows > limit:
        raise UserError(f"input has {num_rows} rows, more than the limit of {limit} "
                        f"(BATCHINFER_MAX_INPUT_ROWS); split it into several jobs")
