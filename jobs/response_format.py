"""A job's or a row's `response_format`, in OpenAI's shape, as the engine's structured
output constraint.

Accepted (the whole job's `--response-format FILE.json`, or a row's `response_format`
column holding the same JSON as text):
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`: JSON that
  validates against the schema;
- `{"type": "json_object"}`: any JSON object;
- `{"type": "regex", "regex": "..."}`: text that fully matches the regex;
- `{"type": "choice", "choice": ["a", "b", ...]}`: exactly one of the strings;
- `{"type": "text"}`: no constraint (OpenAI's default).
The result is the keyword arguments of `engine.StructuredOutputsParams` (vLLM's names:
json, regex, choice), or None for text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.errors import UserError

# What json_object asks for, as a schema the grammar backends compile like any other.
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """The structured-output constraint for a response_format (a dict, or JSON text);
    ValueError says what is wrong with it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"response_format is not valid JSON: {error}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError('response_format must be a JSON object with a "type" '
                         '(json_schema, json_object, regex, choice or text)')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json": ANY_JSON_OBJECT}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('response_format json_schema needs "json_schema": '
                             '{"name": ..., "schema": {...}}')
        return {"json": spec["schema"]}
    if kind == "regex":
        if not isinstance(value.get("regex"), str) or not value["regex"]:
            raise ValueError('response_format regex needs "regex": a non-empty string')
        return {"regex": value["regex"]}
    if kind == "choice":
        choice = value.get("choice")
        if (not isinstance(choice, list) or not choice
                or not all(isinstance(c, str) and c for c in choice)):
            raise ValueError('response_format choice needs "choice": a list of non-empty '
                             'strings')
        return {"choice": list(choice)}
    raise ValueError(f"unknown response_format type {kind!r}: use json_schema, json_object, "
                     f"regex, choice or text")


def read_response_format_file(path: str) -> dict[str, Any]:
    """The --response-format FILE.json flag: the file's JSON object (checked as above);
    UserError, one line, when it cannot be read or is not a response format."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UserError(f"cannot read response format file {path}: {error.strerror}") from None
    try:
        value = json.loads(text)
        parse_response_format(value)
    except (json.JSONDecodeError, ValueError) as error:
        raise UserError(f"response format file {path}: {error}") from None
    return value
