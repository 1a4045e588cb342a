"""Job specs, and validation of an input file against one: every mistake is a clear UserError."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import SamplingParams
from jobs.errors import UserError
from jobs.input_file import validate_input
from jobs.spec import JobSpec, sampling_params

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(tmp_path, table: pa.Table, **options):
    path = tmp_path / "input.parquet"
    pq.write_table(table, path, **options)
    return path


def test_spec_round_trips_through_a_dict():
    spec = JobSpec(model="m", messages_column="chat", id_column="id", max_tokens=5,
                   temperature=0.5, top_p=0.9, top_k=40, seed=7, stop="END", shard_size=10,
                   queue="gpu-a", idempotency_key="k1")
    assert spec.stop == ["END"]
    assert spec.text_column == "chat"
    assert JobSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("values", "message"), [
    ({"model": ""}, "model must be a non-empty string"),
    ({"model": "m", "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"model": "m", "max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"model": "m", "temperature": -1}, "temperature must be >= 0"),
    ({"model": "m", "temperature": math.nan}, "temperature must be a finite number"),
    ({"model": "m", "top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"model": "m", "top_k": -2}, "top_k must be -1"),
    ({"model": "m", "seed": "7"}, "seed must be an integer"),
    ({"model": "m", "stop": [""]}, "stop must be a non-empty string"),
    ({"model": "m", "shard_size": 0}, "shard_size must be at least 1"),
    ({"model": "m", "n": 0}, r"n must be an int in 1\.\.128"),
    ({"model": "m", "n": 1.5}, "n must be an integer"),
    ({"model": "m", "prompt_column": None}, "prompt_column must be a non-empty string"),
])
def test_bad_spec_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        JobSpec(**values)


def test_from_dict_names_unknown_fields_and_needs_a_model():
    with pytest.raises(UserError, match="unknown job spec field.*colour"):
        JobSpec.from_dict({"model": "m", "colour": "red"})
    with pytest.raises(UserError, match="needs a model"):
        JobSpec.from_dict({"max_tokens": 3})
    with pytest.raises(UserError, match="JSON object"):
        JobSpec.from_dict(["m"])


def test_sampling_params_take_row_overrides_over_spec_defaults():
    spec = JobSpec(model="m", max_tokens=8, temperature=0.0, stop=["x"])
    assert sampling_params(spec, {}) == SamplingParams(max_tokens=8, top_k=-1, temperature=0.0,
                                                       top_p=1.0, stop=["x"])
    row = sampling_params(spec, {"max_tokens": 3.0, "temperature": 0.7, "seed": 5,
                                 "top_p": None, "stop": "END"})
    assert row == SamplingParams(max_tokens=3, top_k=-1, seed=5, temperature=0.7, top_p=1.0,
                                 stop=["END"])
    assert isinstance(row.max_tokens, int)
    assert sampling_params(spec, {"n": 4.0}).n == 4  # a float column of whole numbers
    assert sampling_params(spec, {"stop": []}).stop is None  # an explicit "no stop strings"
    for overrides, message in (({"max_tokens": 2.5}, "max_tokens must be an integer"),
                               ({"max_tokens": -1}, "max_tokens must be at least 1"),
                               ({"temperature": math.inf}, "temperature must be a finite"),
                               ({"top_p": 1.5}, "top_p must be in"),
                               ({"n": 129}, "n must be an int in"),
                               ({"stop": ["a", None]}, "stop strings must be non-empty")):
        with pytest.raises(ValueError, match=message):
            sampling_params(spec, overrides)


def test_a_valid_input_is_described(tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["x", None, ""], "lang": ["en"] * 3,
                      "max_tokens": [1, None, 3], "stop": [["s"], None, []]})
    info = validate_input(write(tmp_path, table, row_group_size=2), JobSpec(model="m",
                                                                           id_column="id"))
    assert info.num_rows == 3 and info.metadata.num_row_groups == 2
    layout = info.layout
    assert (layout.text_column, layout.is_messages, layout.id_column) == ("prompt", False, "id")
    assert layout.result_id_column == "id"
    assert layout.override_columns == ("max_tokens", "stop")
    assert layout.passthrough_columns == ("lang", "max_tokens", "stop")


def test_without_an_id_column_rows_are_numbered(tmp_path):
    info = validate_input(write(tmp_path, pa.table({"prompt": ["x"]})), JobSpec(model="m"))
    assert info.layout.id_column is None and info.layout.result_id_column == "row_index"


def test_a_messages_column_is_accepted(tmp_path):
    chats = pa.array([[{"role": "user", "content": "hi"}]], MESSAGES_TYPE)
    info = validate_input(write(tmp_path, pa.table({"chat": chats, "prompt": ["kept"]})),
                          JobSpec(model="m", messages_column="chat"))
    assert info.layout.is_messages and info.layout.text_column == "chat"
    assert info.layout.passthrough_columns == ("prompt",)


def test_large_string_and_dictionary_prompts_are_strings(tmp_path):
    table = pa.table({"prompt": pa.array(["a", "b"], pa.large_string()),
                      "stop": pa.array(["x", "y"]).dictionary_encode()})
    assert validate_input(write(tmp_path, table), JobSpec(model="m")).num_rows == 2


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt\n1,hello\n")
    with pytest.raises(UserError, match=r"prompts\.csv is not a Parquet file"):
        validate_input(path, JobSpec(model="m"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="not a Parquet file"):
        validate_input(tmp_path / "empty.parquet", JobSpec(model="m"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        validate_input(tmp_path / "nope.parquet", JobSpec(model="m"))
    with pytest.raises(UserError, match="is a folder"):
        validate_input(tmp_path, JobSpec(model="m"))


BAD_INPUTS = [
    (pa.table({"text": ["a"]}), {},
     r"input has no column 'prompt' \(columns: text\); name the right one with prompt_column \(--prompt-column\)"),
    (pa.table({"prompt": ["a"]}), {"messages_column": "chat"},
     "input has no column 'chat'.*--messages-column"),
    (pa.table({"prompt": [1, 2]}), {},
     "prompt column 'prompt' must be of type string, got int64"),
    (pa.table({"chat": ["hello"]}), {"messages_column": "chat"},
     "messages column 'chat' must be a list of {role: string, content: string}, got string"),
    (pa.table({"chat": pa.array([[{"role": "user", "text": "x"}]])}), {"messages_column": "chat"},
     "messages column 'chat' must be a list of"),
    (pa.table({"prompt": ["a"]}), {"id_column": "id"}, "input has no id column 'id'"),
    (pa.table({"prompt": ["a", "b"], "id": [1, 1]}), {"id_column": "id"},
     "id column 'id' is not unique: 1 appears more than once"),
    (pa.table({"prompt": ["a", "b", "c"], "id": ["x", "y", "x"]}), {"id_column": "id"},
     "id column 'id' is not unique: 'x' appears more than once"),
    (pa.table({"prompt": ["a", "b"], "id": ["x", None]}), {"id_column": "id"},
     r"id column 'id' has an empty \(null\) value at row 1"),
    (pa.table({"prompt": ["a"], "id": [1.5]}), {"id_column": "id"},
     "id column 'id' must be integer or string, got double"),
    (pa.table({"prompt": ["a"]}), {"id_column": "prompt"}, "cannot be the prompt column"),
    (pa.table({"prompt": ["a"], "max_tokens": ["ten"]}), {},
     "column 'max_tokens' \\(per-row max_tokens\\) must be numeric, got string"),
    (pa.table({"prompt": ["a"], "temperature": [True]}), {},
     "column 'temperature' .* must be numeric, got bool"),
    (pa.table({"prompt": ["a"], "seed": [[1]]}), {}, "column 'seed' .* must be numeric"),
    (pa.table({"prompt": ["a"], "stop": [3]}), {},
     "column 'stop' \\(per-row stop strings\\) must be string or list<string>, got int64"),
    (pa.table({"prompt": ["a"], "stop": [[3]]}), {}, "column 'stop' .* must be string or list"),
    (pa.table({"prompt": ["a"], "row_index": [0]}), {},
     "input has a column named 'row_index'.*set id_column \\(--id-column\\) to 'row_index'"),
    (pa.table({"prompt": ["a"], "output": ["x"]}), {},
     "input column\\(s\\) output would clash with result columns"),
    (pa.table({"prompt": pa.array([], pa.string())}), {}, "input has no rows"),
]


@pytest.mark.parametrize(("table", "spec_values", "message"), BAD_INPUTS)
def test_bad_inputs_are_user_errors_that_say_why(tmp_path, table, spec_values, message):
    with pytest.raises(UserError, match=message):
        validate_input(write(tmp_path, table), JobSpec(model="m", **spec_values))


def test_duplicate_ids_are_found_across_row_groups(tmp_path):
    table = pa.table({"prompt": ["p"] * 10, "id": list(range(9)) + [0]})
    with pytest.raises(UserError, match="0 appears more than once"):
        validate_input(write(tmp_path, table, row_group_size=3), JobSpec(model="m", id_column="id"))


def test_validation_reads_no_prompt_data(tmp_path, monkeypatch):
    """Only the id column is read: a check that reads prompts would see the spy's columns."""
    table = pa.table({"prompt": ["x" * 100] * 50, "id": list(range(50))})
    path = write(tmp_path, table, row_group_size=10)
    read_columns = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, columns=None, **kwargs):
        read_columns.append(columns)
        return original(self, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read everything"))
    validate_input(path, JobSpec(model="m", id_column="id"))
    assert read_columns == [["id"]]
