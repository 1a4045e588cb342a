"""OpenAI Batch input files read as a job's input: what fails the file, what fails a line;
and the two files a batch's end renders."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from engine import LLM
from jobs import runner
from jobs.openai_requests import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    BatchFileInvalid,
    parse_batch_file,
)
from jobs.openai_responses import ResponseRenderer
from jobs.spec import INPUT_ERROR_COLUMN, JobSpec, sampling_params
from jobs.store import open_store
from jobs.submit import create_job


def _line(custom_id: str = "a", url: str = CHAT_ENDPOINT, **body) -> dict:
    body.setdefault("model", "m")
    if url == CHAT_ENDPOINT:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _file(*lines: dict | str) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()


def _codes(data: bytes, endpoint: str | None = CHAT_ENDPOINT) -> list[tuple[str, int | None]]:
    with pytest.raises(BatchFileInvalid) as invalid:
        parse_batch_file(data, endpoint)
    return [(e["code"], e["line"]) for e in invalid.value.errors]


def test_what_fails_the_whole_file():
    assert _codes(_file(_line("a"), "{oops", '"text"', _line("a"), {**_line("b"), "method": "GET"},
                        _line("c", url=COMPLETIONS_ENDPOINT), _line("d", model="other"),
                        {**_line("e"), "body": {"messages": []}}, {"custom_id": "", **{
                            k: v for k, v in _line().items() if k != "custom_id"}},
                        {**_line("f"), "extra": 1})) == [
        ("invalid_json_line", 2), ("invalid_json_line", 3), ("duplicate_custom_id", 4),
        ("invalid_method", 5), ("mismatched_url", 6), ("mismatched_model", 7),
        ("missing_required_parameter", 8), ("missing_required_parameter", 9),
        ("invalid_request", 10)]
    assert _codes(b"\n\n") == [("empty_file", None)]
    assert _codes(_file(_line()), endpoint="/v1/embeddings") == [("invalid_endpoint", None)]
    # Without an endpoint (the CLI), the first line's url is the batch's.
    assert _codes(_file(_line("a", url=COMPLETIONS_ENDPOINT), _line("b")), None) == [
        ("mismatched_url", 2)]


def test_the_limits(monkeypatch):
    monkeypatch.setenv("BATCHINFER_MAX_INPUT_ROWS", "2")
    assert _codes(_file(_line("a"), _line("b"), _line("c"))) == [("too_many_requests", None)]
    monkeypatch.setenv("BATCHINFER_MAX_INPUT_BYTES", "100")
    assert _codes(_file(_line("a"), _line("b"))) == [("file_too_large", None)]


def test_a_valid_chat_file_becomes_a_table_and_a_spec():
    requests = parse_batch_file(_file(
        _line("a", max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, n=2,
              stop="\n", logprobs=True, top_logprobs=3, presence_penalty=0.1,
              frequency_penalty=0.2, user="someone", stream=False,
              response_format={"type": "json_object"}),
        _line("b", messages=[{"role": "developer", "content": [
            {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi"}], logprobs=True)))
    assert (requests.endpoint, requests.model) == (CHAT_ENDPOINT, "m")
    a, b = requests.table.to_pylist()
    assert {k: v for k, v in a.items() if v is not None} == {
        "custom_id": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
        "temperature": 0.5, "top_p": 0.9, "seed": 3, "n": 2, "stop": ["\n"], "logprobs": 3,
        "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "response_format": '{"type": "json_object"}'}
    assert b["messages"] == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi"}]
    assert b["logprobs"] == 0 and b[INPUT_ERROR_COLUMN] is None
    spec = JobSpec(**requests.job_settings())
    assert (spec.messages_column, spec.id_column, spec.temperature) == ("messages",
                                                                        "custom_id", 1.0)
    params = sampling_params(spec, {k: v for k, v in a.items()
                                    if k not in ("custom_id", "messages", INPUT_ERROR_COLUMN)})
    assert (params.max_tokens, params.n, params.logprobs, params.seed) == (7, 2, 3, 3)


@pytest.mark.parametrize(("body", "reason"), [
    ({"tools": []}, "body.tools is not supported"),
    ({"stream": True}, "stream is not supported"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "not both"),
    ({"top_logprobs": 2}, "top_logprobs needs body.logprobs: true"),
    ({"logprobs": 2}, "body.logprobs must be true or false"),
    ({"temperature": "hot"}, "body.temperature must be a finite number"),
    ({"n": 1.5}, "body.n must be an integer"),
    ({"stop": [""]}, "body.stop must be"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "name is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"response_format": "json"}, "response_format must be a JSON object"),
])
def test_what_fails_one_chat_line(body, reason):
    requests = parse_batch_file(_file(_line("ok"), _line("bad", **body)))
    ok, bad = requests.table.to_pylist()
    assert ok[INPUT_ERROR_COLUMN] is None
    assert reason in bad[INPUT_ERROR_COLUMN]


def test_completion_lines():
    requests = parse_batch_file(_file(
        _line("a", COMPLETIONS_ENDPOINT, prompt=["one prompt"], logprobs=2, echo=False),
        _line("b", COMPLETIONS_ENDPOINT, prompt=["two", "prompts"]),
        {**_line("c", COMPLETIONS_ENDPOINT), "body": {"model": "m"}}))
    a, b, c = requests.table.to_pylist()
    assert (a["prompt"], a["logprobs"]) == ("one prompt", 2)
    assert "one prompt per request line" in b[INPUT_ERROR_COLUMN]
    assert c[INPUT_ERROR_COLUMN] == "body.prompt is required"
    assert JobSpec(**requests.job_settings()).prompt_column == "prompt"


def test_a_shard_landing_between_the_two_files_is_in_one_of_them(tmp_path, file_store_url,
                                                                   tiny_llama):
    """A cancelled (expired) batch's files: a shard whose results land after the output
    file was rendered goes to the error file as unfinished, not into neither file."""
    store = open_store(file_store_url)
    requests = parse_batch_file(_file(*(_line(f"r{i}", url=COMPLETIONS_ENDPOINT,
                                              prompt=f"story {i}", max_tokens=2)
                                        for i in range(6))), COMPLETIONS_ENDPOINT)
    path = tmp_path / "in.parquet"
    pq.write_table(requests.table, path, row_group_size=3)
    job_id, shards = create_job(store, path, JobSpec(
        **{**requests.job_settings(), "model": str(tiny_llama), "shard_size": 3}))
    assert len(shards) == 2
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="16MiB")
    runner.run_shard(store, job_id, 0, llm)
    renderer = ResponseRenderer(store, job_id)
    outputs = [json.loads(line)["custom_id"] for line in renderer.output_lines()]
    runner.run_shard(store, job_id, 1, llm)  # lands after the output file was rendered
    errors = [json.loads(line) for line in renderer.error_lines("batch_expired")]
    assert outputs == ["r0", "r1", "r2"]
    assert [line["custom_id"] for line in errors] == ["r3", "r4", "r5"]
    assert all(line["error"]["code"] == "batch_expired" for line in errors)
