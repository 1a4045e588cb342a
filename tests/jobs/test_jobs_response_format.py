"""OpenAI's response_format shapes, as the engine's structured-output constraint."""

from __future__ import annotations

import json

import pytest

from jobs.errors import UserError
from jobs.response_format import ANY_JSON_OBJECT, parse_response_format, read_response_format_file

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
          "required": ["label"]}


@pytest.mark.parametrize("value, expected", [
    ({"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}},
     {"json": SCHEMA}),
    ({"type": "json_object"}, {"json": ANY_JSON_OBJECT}),
    ({"type": "regex", "regex": r"\d{3}"}, {"regex": r"\d{3}"}),
    ({"type": "choice", "choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"type": "text"}, None),
])
def test_shapes_become_constraints_from_dicts_and_json_text(value, expected):
    assert parse_response_format(value) == expected
    assert parse_response_format(json.dumps(value)) == expected


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    (["json_schema"], 'must be a JSON object with a "type"'),
    ({"type": "json_schema"}, 'needs "json_schema"'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, "needs"),
    ({"type": "regex", "regex": ""}, "non-empty string"),
    ({"type": "choice", "choice": []}, "list of non-empty"),
    ({"type": "choice", "choice": ["a", 1]}, "list of non-empty"),
    ({"type": "grammar"}, "unknown response_format type 'grammar'"),
])
def test_bad_shapes_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        parse_response_format(value)


def test_the_flag_reads_a_file(tmp_path):
    path = tmp_path / "format.json"
    value = {"type": "choice", "choice": ["a", "b"]}
    path.write_text(json.dumps(value))
    assert read_response_format_file(str(path)) == value
    with pytest.raises(UserError, match="cannot read response format file"):
        read_response_format_file(str(tmp_path / "missing.json"))
    path.write_text("{")
    with pytest.raises(UserError, match="Expecting property name"):
        read_response_format_file(str(path))
    path.write_text('{"type": "regex"}')
    with pytest.raises(UserError, match='format.json: response_format regex needs "regex"'):
        read_response_format_file(str(path))
