"""An OpenAI Batch input file (JSONL request lines) as a job's input table and spec.

Each line is `{"custom_id", "method": "POST", "url", "body"}`. What makes the whole file
unusable fails it at once, with OpenAI's list of errors (`BatchFileInvalid`): a line that
is not a JSON object, a missing or repeated `custom_id`, a `method` other than POST, a
`url` other than the batch's endpoint, a body without a `model` or with another model
than the first line's, more lines or bytes than the limits (jobs/limits.py). What is wrong
with one request's body (a field we do not support, a value of the wrong type) fails only
that line: it becomes a row whose `input_error` column holds the reason, which a shard
records as an invalid row (status 400 in the error file) while the others run.

The table: `custom_id` (the job's id column), `messages` (chat) or `prompt` (completions),
then one column per sampling field (jobs/spec.py's per-row overrides, null where the line
does not set it) and `input_error`. Sampling values are checked where every job's are,
when the shard runs, so the messages are the same as for a Parquet input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from jobs import limits
from jobs.errors import UserError
from jobs.spec import INPUT_ERROR_COLUMN, finite_number, whole_number

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
ID_COLUMN = "custom_id"
MESSAGES_COLUMN = "messages"
PROMPT_COLUMN = "prompt"
# A batch fails with at most this many listed errors (the first ones), as OpenAI lists.
MAX_LISTED_ERRORS = 100
# OpenAI's defaults where ours differ: sampling at temperature 1.
OPENAI_DEFAULTS = {"temperature": 1.0}
ROLES = ("system", "developer", "user", "assistant")

# Body fields -> the override column each fills (the same for both endpoints).
_INTEGERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "n": "n",
             "seed": "seed", "top_k": "top_k"}
_NUMBERS = {"temperature": "temperature", "top_p": "top_p",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repetition_penalty": "repetition_penalty", "min_p": "min_p"}
# Accepted and without effect on what is generated: an end-user id, streaming off.
_NO_EFFECT = {"model", "user"}

COLUMN_TYPES: dict[str, pa.DataType] = {
    "max_tokens": pa.int64(), "n": pa.int64(), "seed": pa.int64(), "top_k": pa.int64(),
    "logprobs": pa.int64(), "temperature": pa.float64(), "top_p": pa.float64(),
    "presence_penalty": pa.float64(), "frequency_penalty": pa.float64(),
    "repetition_penalty": pa.float64(), "min_p": pa.float64(),
    "stop": pa.list_(pa.string()), "response_format": pa.string(),
}
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class BatchFileInvalid(UserError):
    """The file cannot run at all: errors as OpenAI lists them, [{code, message, param,
    line}] (line numbers from 1)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0]
        where = f"line {first['line']}: " if first.get("line") else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"invalid batch file: {where}{first['message']}{more}")


@dataclass(frozen=True)
class BatchRequests:
    """A valid batch file: its endpoint, model, and the job's input table."""

    endpoint: str
    model: str
    table: pa.Table

    def job_settings(self) -> dict[str, Any]:
        """The JobSpec fields that run this table (the Python client's submit keywords):
        the model, the columns, and OpenAI's defaults for what the lines leave out."""
        text = ({"messages_column": MESSAGES_COLUMN} if self.endpoint == CHAT_ENDPOINT
                else {"prompt_column": PROMPT_COLUMN})
        # Without max_tokens a request may run to the context, as OpenAI's do.
        return {"model": self.model, "id_column": ID_COLUMN, **text, **OPENAI_DEFAULTS,
                "max_tokens": limits.max_tokens_limit()}


def _error(code: str, message: str, line: int | None = None,
           param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_batch_file(data: bytes, endpoint: str | None = None) -> BatchRequests:
    """The requests of a batch file; endpoint: the batch's (None: the lines' own, which
    must all agree). BatchFileInvalid lists what makes the file unusable."""
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise BatchFileInvalid([_error("invalid_endpoint", f"endpoint {endpoint!r} is not "
                                       f"supported: use {' or '.join(ENDPOINTS)}",
                                       param="endpoint")])
    if len(data) > limits.max_input_bytes():
        raise BatchFileInvalid([_error("file_too_large", f"the file has {len(data)} bytes, "
                                       f"over the limit of {limits.max_input_bytes()} "
                                       f"(BATCHINFER_MAX_INPUT_BYTES)")])
    parser = _FileParser(endpoint)
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            parser.add(number, line)
        if len(parser.errors) >= MAX_LISTED_ERRORS:
            break
    return parser.result()


class _FileParser:
    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self.model: str | None = None
        self.errors: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.rows: list[dict[str, Any]] = []

    def add(self, number: int, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.errors.append(_error("invalid_json_line", "this line is not valid JSON", number))
            return
        if not isinstance(request, dict):
            self.errors.append(_error("invalid_json_line", "a request line must be a JSON "
                                      "object", number))
            return
        problem = self._frame_problem(request, number)
        if problem is not None:
            self.errors.append(problem)
            return
        self.ids.add(request["custom_id"])
        self.rows.append(_request_row(request["custom_id"], request["body"], self.endpoint))

    def _frame_problem(self, request: dict[str, Any], number: int) -> dict[str, Any] | None:
        unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
        if unknown:
            return _error("invalid_request", f"unknown field {unknown[0]!r} in the request "
                          f"line", number, unknown[0])
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return _error("missing_required_parameter", "custom_id must be a non-empty "
                          "string", number, "custom_id")
        if custom_id in self.ids:
            return _error("duplicate_custom_id", f"custom_id {custom_id!r} is not unique",
                          number, "custom_id")
        if request.get("method") != "POST":
            return _error("invalid_method", "method must be POST", number, "method")
        url = request.get("url")
        if self.endpoint is None and url in ENDPOINTS:
            self.endpoint = url
        if url != self.endpoint:
            expected = self.endpoint or " or ".join(ENDPOINTS)
            return _error("mismatched_url", f"url {url!r} does not match the batch's "
                          f"endpoint {expected}", number, "url")
        body = request.get("body")
        if not isinstance(body, dict):
            return _error("invalid_request", "body must be a JSON object", number, "body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error("missing_required_parameter", "body.model must be a model name",
                          number, "body.model")
        if self.model is None:
            self.model = model
        if model != self.model:
            return _error("mismatched_model", f"model {model!r} differs from the first "
                          f"line's {self.model!r}: a batch runs one model", number,
                          "body.model")
        return None

    def result(self) -> BatchRequests:
        if not self.errors and not self.rows:
            self.errors.append(_error("empty_file", "the file has no request lines"))
        if not self.errors and len(self.rows) > limits.max_input_rows():
            self.errors.append(_error("too_many_requests", f"the file has {len(self.rows)} "
                                      f"requests, over the limit of {limits.max_input_rows()} "
                                      f"(BATCHINFER_MAX_INPUT_ROWS)"))
        if self.errors:
            raise BatchFileInvalid(self.errors)
        assert self.endpoint is not None and self.model is not None
        text_column, text_type = ((MESSAGES_COLUMN, MESSAGES_TYPE)
                                  if self.endpoint == CHAT_ENDPOINT
                                  else (PROMPT_COLUMN, pa.string()))
        types = {ID_COLUMN: pa.string(), text_column: text_type, **COLUMN_TYPES,
                 INPUT_ERROR_COLUMN: pa.string()}
        table = pa.table({name: pa.array([row.get(name) for row in self.rows], type)
                          for name, type in types.items()})
        return BatchRequests(self.endpoint, self.model, table)


class _LineError(ValueError):
    """What is wrong with one request's body: that line fails, the batch goes on (as
    does any ValueError the checks of a body raise)."""


def _request_row(custom_id: str, body: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {ID_COLUMN: custom_id}
    try:
        row.update(_body_columns(body, endpoint == CHAT_ENDPOINT))
    except ValueError as error:
        return {ID_COLUMN: custom_id, INPUT_ERROR_COLUMN: str(error)}
    return row


def _body_columns(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    text_field = "messages" if chat else "prompt"
    if text_field not in body:
        raise _LineError(f"body.{text_field} is required")
    for name, value in body.items():
        if value is None or name in _NO_EFFECT:
            continue
        if name == text_field:
            columns[MESSAGES_COLUMN if chat else PROMPT_COLUMN] = (
                _messages(value) if chat else _prompt(value))
        elif name in _INTEGERS:
            if _INTEGERS[name] in columns:  # max_tokens and max_completion_tokens
                raise _LineError("give max_tokens or max_completion_tokens, not both")
            columns[_INTEGERS[name]] = _whole(name, value)
        elif name in _NUMBERS:
            columns[_NUMBERS[name]] = _finite(name, value)
        elif name == "stop":
            columns["stop"] = _stop(value)
        elif name == "stream":
            if value is not False:
                raise _LineError("stream is not supported in a batch")
        elif name == "response_format":
            if not isinstance(value, dict):
                raise _LineError("body.response_format must be a JSON object")
            columns["response_format"] = json.dumps(value, sort_keys=True)
        elif chat and name in ("logprobs", "top_logprobs"):
            continue  # read together below
        elif not chat and name == "logprobs":
            columns["logprobs"] = _whole(name, value)
        elif not chat and name == "echo":
            if value is not False:
                raise _LineError("echo is not supported")
        else:
            raise _LineError(f"body.{name} is not supported")
    if chat:
        logprobs = _chat_logprobs(body.get("logprobs"), body.get("top_logprobs"))
        if logprobs is not None:
            columns["logprobs"] = logprobs
    return columns


def _chat_logprobs(wanted: Any, top: Any) -> int | None:
    """Chat asks with logprobs: true and top_logprobs: K (0-20): the engine's logprobs=K."""
    if wanted is not None and not isinstance(wanted, bool):
        raise _LineError(f"body.logprobs must be true or false, got {wanted!r}")
    if top is not None:
        if not wanted:
            raise _LineError("body.top_logprobs needs body.logprobs: true")
        return _whole("top_logprobs", top)
    return 0 if wanted else None


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _LineError("body.messages must be a non-empty list of messages")
    messages = []
    for position, message in enumerate(value):
        where = f"body.messages[{position}]"
        if not isinstance(message, dict):
            raise _LineError(f"{where} must be an object with role and content")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise _LineError(f"{where}.{unknown[0]} is not supported")
        role = message.get("role")
        if role not in ROLES:
            raise _LineError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        # OpenAI's developer messages are what chat templates call system messages.
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message.get("content"), where)})
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str) and set(part) == {"type", "text"}):
                raise _LineError(f"{where}.content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _LineError(f"{where}.content must be a string or a list of text parts")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # a list of one prompt is that prompt
    if not isinstance(value, str):
        raise _LineError("body.prompt must be a string (one prompt per request line)")
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _LineError("body.stop must be a string or a list of non-empty strings")
    return stops


def _whole(name: str, value: Any) -> int:
    return whole_number(f"body.{name}", value)


def _finite(name: str, value: Any) -> float:
    return finite_number(f"body.{name}", value)
