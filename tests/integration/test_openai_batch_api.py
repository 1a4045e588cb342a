"""`batchinfer serve` driven by the official openai SDK: a live server on a free loopback
port over real Redis, the moto S3 server and a worker process, as a user's code would
drive OpenAI's Batch API with another base_url and api_key."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from engine import LLM, SamplingParams
from jobs.errors import UserError
from jobs.file_store import FileStore
from jobs.manifest import load_manifest
from jobs.spec import spec_options
from jobs.store import Store, get_json, open_store
from tests.servers import free_port, log_tail, wait_until
from tests.worker_processes import running_workers, worker_env
from workers import commands
from workers.api import batches, objects
from workers.api.auth import ApiKeys, key_hash, owner_id

KEY, OTHER_KEY = "sk-test-one", "sk-test-two"
MODEL = "tiny-chat"
BATCH_TIMEOUT = 240
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
UPLOAD_LIMIT = 300_000  # bytes: BATCHINFER_MAX_INPUT_BYTES of the server under test


_ENVIRONMENTS: dict[str, dict] = {}  # a server's URL -> its environment
_SERVE_LOGS: dict[str, Path] = {}  # a server's URL -> what it printed


def _server_env(url: str) -> dict:
    return _ENVIRONMENTS[url]


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server, s3_server, tiny_llama) -> Iterator[str]:
    """A serve process and one worker over the same store and broker; the server's URL."""
    folder = tmp_path_factory.mktemp("api")
    (folder / "models.json").write_text(json.dumps({MODEL: str(tiny_llama)}))
    # One key as itself, one as its SHA-256: both forms a keys file takes.
    (folder / "keys").write_text(f"# keys\n{KEY}\n"
                                 f"sha256:{hashlib.sha256(OTHER_KEY.encode()).hexdigest()}\n")
    store_url = f"s3://{s3_server.bucket}/api-{uuid.uuid4().hex[:8]}"
    # Shards of 10 requests: a batch that stops early keeps the shards that finished.
    env = worker_env(redis_server.url, store_url, BATCHINFER_MODELS=str(folder / "models.json"),
                     BATCHINFER_API_KEYS=str(folder / "keys"), BATCHINFER_API_SHARD_SIZE="10",
                     BATCHINFER_MAX_INPUT_BYTES=str(UPLOAD_LIMIT))
    port = free_port()
    log = folder / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "workers.cli", "serve", "--port",
                                   str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _ENVIRONMENTS[url] = env
    _SERVE_LOGS[url] = log
    try:
        wait_until(lambda: _answers(url), 60, f"serve on port {port}")
        with running_workers(1, env, folder):
            yield url
    except BaseException:
        print(f"--- serve log ---\n{log_tail(log, 60)}")
        raise
    finally:
        server.terminate()
        server.wait(30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/docs", timeout=5):
            return True
    except OSError:
        return False


def _client(api: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0)


def _line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL,
                                                                           **body}}


def _upload(client: openai.OpenAI, lines: list[dict], tmp_path: Path) -> str:
    path = tmp_path / f"requests-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as file:
        return client.files.create(file=file, purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = BATCH_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.5)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLM:
    """The engine as the worker runs it (float32), for the outputs each request must have."""
    return LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="64MiB")


def _chat_text(engine: LLM, messages: list[dict], max_tokens: int) -> str:
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    [output] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))
    return output.text


def test_a_chat_batch_runs_every_request_once(api, engine, tmp_path):
    client = _client(api)
    chats = [[{"role": "user", "content": f"tell me about cat {i}"}] for i in range(6)]
    # A word from the middle of the greedy answer, as a stop string: the answer ends before
    # it. top_p keeps only the likeliest token, so temperature 1 still gives that answer.
    greedy = _chat_text(engine, chats[4], 16)
    stop = greedy.split()[len(greedy.split()) // 2]
    lines = [_line(f"req-{i}", {"messages": chat, "max_tokens": 6 + i, "temperature": 0})
             for i, chat in enumerate(chats)]
    lines.append(_line("scored", {"messages": chats[0], "max_tokens": 4, "temperature": 0,
                                  "logprobs": True, "top_logprobs": 2}))
    lines.append(_line("two", {"messages": chats[1], "max_tokens": 5, "n": 2, "seed": 3}))
    lines.append(_line("label", {"messages": chats[3], "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "label", "schema": {
            "type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}},
            "required": ["pet"]}}}}))
    lines.append(_line("bad", {"messages": chats[2], "tools": []}))
    lines.append(_line("too-hot", {"messages": chats[2], "temperature": -1}))
    lines.append(_line("stopped", {"messages": chats[4], "max_tokens": 16, "temperature": 1,
                                   "top_p": 0.01, "seed": 5, "stop": [stop]}))
    # Far longer than the model's context (512 tokens): refused when it runs.
    lines.append(_line("too-long", {"messages": [{"role": "user", "content": "cat " * 1000}],
                                    "max_tokens": 2}))
    file_id = _upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT,
                                  completion_window="24h", metadata={"team": "labels"})
    assert batch.status == "in_progress" and batch.metadata == {"team": "labels"}
    batch = _wait(client, batch.id)
    assert batch.status == "completed", batch
    outputs_file = client.files.retrieve(batch.output_file_id)
    assert (outputs_file.purpose, outputs_file.filename) == ("batch_output",
                                                             f"{batch.id}_output.jsonl")
    assert file_id in [f.id for f in client.files.list(purpose="batch")]
    assert file_id not in [f.id for f in client.files.list(purpose="batch_output")]
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (13, 10, 3)
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at

    outputs = _lines(client, batch.output_file_id)
    errors = _lines(client, batch.error_file_id)
    # Every request exactly once, outputs in input order.
    assert [line["custom_id"] for line in outputs] == [f"req-{i}" for i in range(6)] + [
        "scored", "two", "label", "stopped"]
    assert [line["custom_id"] for line in errors] == ["bad", "too-hot", "too-long"]
    for line in outputs:
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
        usage = line["response"]["body"]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for i, line in enumerate(outputs[:6]):
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        [choice] = body["choices"]
        assert choice["message"]["content"] == _chat_text(engine, chats[i], 6 + i)
        assert choice["finish_reason"] in ("stop", "length")
    usage = [line["response"]["body"]["usage"] for line in outputs]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage)

    scored = outputs[6]["response"]["body"]["choices"][0]
    tokens = scored["logprobs"]["content"]
    assert len(tokens) == outputs[6]["response"]["body"]["usage"]["completion_tokens"]
    for token in tokens:
        assert token["logprob"] <= 0 and len(token["top_logprobs"]) == 2
        assert token["top_logprobs"][0]["logprob"] >= token["top_logprobs"][1]["logprob"]
        assert token["top_logprobs"][0]["logprob"] == token["logprob"]  # greedy: the best
    two = outputs[7]["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert 2 <= two["usage"]["completion_tokens"] <= 10  # both samples' tokens, 5 at most each

    label = outputs[8]["response"]["body"]["choices"][0]
    if label["finish_reason"] == "stop":  # complete: valid under the schema
        assert json.loads(label["message"]["content"])["pet"] in ("cat", "dog")
    else:  # cut at max_tokens: a prefix of a valid object
        assert label["message"]["content"].startswith('{')
    assert errors[0]["response"]["status_code"] == 400
    assert "body.tools is not supported" in errors[0]["response"]["body"]["error"]["message"]
    assert "temperature" in errors[1]["response"]["body"]["error"]["message"]
    [stopped] = outputs[9]["response"]["body"]["choices"]
    assert stopped["message"]["content"] == greedy[:greedy.index(stop)]
    assert stopped["finish_reason"] == "stop"
    too_long = errors[2]["response"]
    assert too_long["status_code"] == 400
    assert "more than the context length" in too_long["body"]["error"]["message"]


def test_a_completions_batch_with_logprobs(api, engine, tmp_path):
    client = _client(api)
    prompts = ["the cat sat", "a dog ran to the", "once upon"]
    lines = [_line(f"p{i}", {"prompt": p, "max_tokens": 5, "temperature": 0, "logprobs": 3},
                   COMPLETIONS) for i, p in enumerate(prompts)]
    batch = client.batches.create(input_file_id=_upload(client, lines, tmp_path),
                                  endpoint=COMPLETIONS, completion_window="24h")
    batch = _wait(client, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    outputs = _lines(client, batch.output_file_id)
    expected = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    for line, want in zip(outputs, expected, strict=True):
        body = line["response"]["body"]
        assert body["object"] == "text_completion"
        [choice] = body["choices"]
        assert choice["text"] == want.text
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(want.token_ids) == len(logprobs["token_logprobs"])
        assert all(len(top) <= 3 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == 0


def test_a_malformed_file_fails_the_batch_with_errors(api, tmp_path):
    client = _client(api)
    good = _line("a", {"messages": [{"role": "user", "content": "hi"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps(good),
                               json.dumps({**good, "custom_id": "b", "url": COMPLETIONS})]))
    with path.open("rb") as file:
        file_id = client.files.create(file=file, purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_json_line", 2), ("duplicate_custom_id", 3), ("mismatched_url", 4)]
    assert client.batches.retrieve(batch.id).status == "failed"

    unknown = _upload(client, [_line("a", {"messages": [{"role": "user", "content": "x"}]})
                               | {"body": {"model": "/etc", "messages": []}}], tmp_path)
    batch = client.batches.create(input_file_id=unknown, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "model_not_found"


def test_keys_and_owners(api, tmp_path):
    client = _client(api)
    file_id = _upload(client, [_line("a", {"messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 3})], tmp_path)
    with pytest.raises(openai.AuthenticationError):
        _client(api, "sk-wrong").files.list()
    with pytest.raises(urllib.error.HTTPError) as refused:  # no Authorization header
        urllib.request.urlopen(f"{api}/v1/batches", timeout=10)
    assert refused.value.code == 401
    assert json.load(refused.value)["error"]["code"] == "invalid_api_key"
    other = _client(api, OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in other.batches.list()]
    assert file_id not in [f.id for f in other.files.list()]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                              completion_window="24h")
    for refused in ({"metadata": {f"key{i}": "x" for i in range(17)}},  # over 16 pairs
                    {"metadata": {"count": 3}}, {"completion_window": "1x"}):
        with pytest.raises(openai.BadRequestError):
            client.batches.create(**{"input_file_id": file_id, "endpoint": CHAT,
                                     "completion_window": "24h", **refused})
    _wait(client, batch.id)
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    served = _SERVE_LOGS[api].read_text()
    assert "/v1/batches" in served  # the log shows requests, and none of their keys
    assert all(key not in served for key in (KEY, OTHER_KEY, "sk-wrong"))


def test_an_upload_over_the_limit_is_refused(api, tmp_path):
    client = _client(api)
    path = tmp_path / "big.jsonl"
    path.write_bytes(b" " * (UPLOAD_LIMIT + 1))
    with path.open("rb") as file, pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=file, purpose="batch")
    assert refused.value.status_code == 413
    assert "BATCHINFER_MAX_INPUT_BYTES" in refused.value.message
    assert str(tmp_path) not in refused.value.message  # no paths in errors
    assert [f.filename for f in client.files.list()].count("big.jsonl") == 0


def test_listing_batches_pages_newest_first(api, tmp_path):
    client = _client(api, OTHER_KEY)
    file_id = _upload(client, ["not a request"], tmp_path)  # each batch fails at once
    created = [client.batches.create(input_file_id=file_id, endpoint=CHAT,
                                     completion_window="24h").id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert first.has_more and [b.id for b in first.data] == created[::-1][:2]
    every = [b.id for b in client.batches.list(limit=2)]  # the SDK follows the cursor
    assert every[:5] == created[::-1]
    # A cursor that is no batch of this key's ends the listing, not restarts it.
    for unknown in (client.batches.list(after=f"batch_{'0' * 32}"),
                    client.batches.list(after="nonsense"),
                    client.files.list(after=f"file-{'0' * 32}")):
        assert (unknown.data, unknown.has_more) == ([], False)


def _long_lines(count: int, short: int = 0) -> list[dict]:
    """count requests, the first `short` of them (one shard) of two tokens, the others
    running to the context (512 tokens): many seconds of work on the worker."""
    return [_line(f"long-{i}", {"messages": [{"role": "user", "content": f"story {i}"}],
                                "max_tokens": 2 if i < short else 2000, "temperature": 0})
            for i in range(count)]


def _covers_once(outputs: list[dict], errors: list[dict], count: int, code: str) -> None:
    ids = [line["custom_id"] for line in outputs + errors]
    assert sorted(ids) == sorted(f"long-{i}" for i in range(count))
    unfinished = [line for line in errors if line["response"] is None]
    assert unfinished and all(line["error"]["code"] == code for line in unfinished)


def test_cancel_keeps_what_ran(api, tmp_path):
    client = _client(api)
    count = 40
    batch = client.batches.create(input_file_id=_upload(client, _long_lines(count), tmp_path),
                                  endpoint=CHAT, completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    outputs, errors = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    _covers_once(outputs, errors, count, "batch_cancelled")
    counts = batch.request_counts
    assert (counts.completed, counts.failed) == (len(outputs), count - len(outputs))


def test_an_expired_window_stops_the_batch(api, tmp_path):
    client = _client(api)
    count = 200
    lines = _long_lines(count, short=10)
    batch = client.batches.create(input_file_id=_upload(client, lines, tmp_path),
                                  endpoint=CHAT, completion_window="4s")
    assert batch.expires_at == batch.created_at + 4
    batch = _wait(client, batch.id)
    assert batch.status == "expired" and batch.expired_at >= batch.expires_at
    outputs, errors = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    _covers_once(outputs, errors, count, "batch_expired")
    # The first shard, quick, finished in time: its requests are kept.
    assert {f"long-{i}" for i in range(10)} <= {line["custom_id"] for line in outputs}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (
        len(outputs), count - len(outputs))


def test_the_sweep_expires_a_batch_nobody_looks_at(api, tmp_path):
    """What the server's sweep thread runs every 30 seconds, run here at once: a batch
    past its window is stopped without anyone polling it."""
    client = _client(api)
    batch = client.batches.create(input_file_id=_upload(client, _long_lines(60), tmp_path),
                                  endpoint=CHAT, completion_window="1s")
    store = open_store(_server_env(api)["BATCHINFER_STORE_URL"])
    record = get_json(store, objects.batch_key(batch.id))
    assert store.exists(batches.ACTIVE_PREFIX + batch.id) and not record.get("_expiring")
    wait_until(lambda: time.time() > batch.expires_at + 1, 10, "the window's end")
    batches.expire_overdue(store)
    record = get_json(store, objects.batch_key(batch.id))
    assert record["_expiring"]
    assert load_manifest(store, record["_job_id"])["state"] in ("cancelling", "cancelled")
    assert _wait(client, batch.id).status == "expired"
    assert not store.exists(batches.ACTIVE_PREFIX + batch.id)


def test_serve_refuses_to_start_without_keys(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "BATCHINFER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "workers.cli", "serve", "--port",
                           str(free_port())], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "batchinfer: error: BATCHINFER_API_KEYS is not set: the server needs a file of API "
        "keys (one a line, or their SHA-256) and refuses to start without"]


def test_the_same_file_through_the_cli(api, tmp_path):
    """`batchinfer submit requests.jsonl` and `results --format jsonl`: the lines the API
    gives, for the same file, without the server."""
    client = _client(api)
    lines = [_line(f"c{i}", {"messages": [{"role": "user", "content": f"hello {i}"}],
                             "max_tokens": 5, "temperature": 0}) for i in range(3)]
    lines.append(_line("broken", {"messages": "not a list"}))
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as file:
        file_id = client.files.create(file=file, purpose="batch").id
    batch = _wait(client, client.batches.create(input_file_id=file_id, endpoint=CHAT,
                                                completion_window="24h").id)
    env = _server_env(api)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=env,
                              capture_output=True, text=True, timeout=BATCH_TIMEOUT)

    submitted = cli("submit", str(path), "--wait")
    assert submitted.returncode == 3, submitted.stderr  # completed, one request failed
    job_id = submitted.stdout.strip()
    assert cli("results", job_id, "--format", "jsonl", "-o", str(tmp_path / "out.jsonl")
               ).returncode == 0
    assert cli("errors", job_id, "--format", "jsonl", "-o", str(tmp_path / "err.jsonl")
               ).returncode == 0

    def comparable(line: dict) -> tuple:
        response = line["response"]
        body = response["body"]
        usage = body.get("usage", {})  # less cached tokens: the second run hits the cache
        return (line["custom_id"], response["status_code"], body.get("choices"),
                usage.get("prompt_tokens"), usage.get("completion_tokens"),
                body.get("error", {}).get("message"))

    from_cli = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [comparable(x) for x in from_cli] == [
        comparable(x) for x in _lines(client, batch.output_file_id)]
    errors = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert [comparable(x) for x in errors] == [
        comparable(x) for x in _lines(client, batch.error_file_id)]
    assert cli("submit", str(path), "--model", "other").returncode == 2


def test_api_keys_from_a_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\n\nsk-plain\nsha256:{key_hash('sk-hashed')}\n"
                         f"{key_hash('sk-bare').upper()}\n")
    monkeypatch.setenv("BATCHINFER_API_KEYS", str(keys_file))
    keys = ApiKeys.from_env()
    for key in ("sk-plain", "sk-hashed", "sk-bare"):
        assert keys.owner(f"Bearer {key}") == owner_id(key_hash(key))
    assert keys.owner("Bearer sk-other") is None
    assert keys.owner("sk-plain") is None  # not a Bearer header
    assert keys.owner(None) is None
    keys_file.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no keys"):
        ApiKeys.from_env()
    monkeypatch.setenv("BATCHINFER_API_KEYS", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot read the keys file"):
        ApiKeys.from_env()


class _StubJob:
    def __init__(self) -> None:
        self.id, self.cancelled_by = "job-stub", None

    def cancel(self, by: str) -> None:
        self.cancelled_by = by


class _StubClient:
    """What create_batch and cancel_batch use of a Client: its store, submit and job;
    submit runs during_submit first, as another request could while a batch validates."""

    def __init__(self, store: Store, during_submit: Any = lambda: None) -> None:
        self.store, self.made, self._during_submit = store, _StubJob(), during_submit

    def submit(self, table: Any, **settings: Any) -> _StubJob:
        self._during_submit()
        return self.made

    def job(self, job_id: str) -> _StubJob:
        assert job_id == self.made.id
        return self.made


def _local_input(tmp_path: Path, monkeypatch, registry: Path) -> tuple[Store, dict]:
    """A store in a folder holding one uploaded chat file, and BATCHINFER_MODELS."""
    monkeypatch.setenv("BATCHINFER_MODELS", str(registry))
    store = FileStore(tmp_path / "store")
    input_file = {"id": objects.new_file_id()}
    line = _line("a", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    store.put_bytes(objects.content_key(input_file["id"]), json.dumps(line).encode())
    return store, input_file


def test_a_broken_registry_fails_the_batch_without_its_path(tmp_path, monkeypatch, caplog):
    registry = tmp_path / "secret-folder" / "models.json"  # missing: cannot be read
    store, input_file = _local_input(tmp_path, monkeypatch, registry)
    with caplog.at_level(logging.ERROR, logger=batches.__name__):
        record = batches.create_batch(_StubClient(store), "owner", input_file, CHAT, "24h",
                                      None)
    assert record["status"] == "failed"
    [error] = record["errors"]["data"]
    assert error["message"] == batches.REGISTRY_UNREADABLE
    assert "secret-folder" not in json.dumps(record)
    assert str(registry) in caplog.text  # the operator learns which file


def test_a_batch_cancelled_while_validating_stays_cancelled(tmp_path, monkeypatch):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({MODEL: "unused"}))
    store, input_file = _local_input(tmp_path, monkeypatch, registry)
    seen = []

    def cancel_meanwhile() -> None:
        [key] = store.list(f"{objects.PREFIX}batches/")
        seen.append(batches.cancel_batch(client, get_json(store, key)))

    client = _StubClient(store, cancel_meanwhile)
    record = batches.create_batch(client, "owner", input_file, CHAT, "24h", None)
    [cancelled] = seen
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"]
    assert record["status"] == "cancelling"
    assert client.made.cancelled_by == batches.CANCELLED_BY  # its job stopped at once
    stored = get_json(store, objects.batch_key(record["id"]))
    assert stored["_job_id"] == client.made.id
    assert stored["cancelling_at"] == cancelled["cancelling_at"]


def test_submit_takes_any_case_of_jsonl_as_batch_lines(monkeypatch):
    submitted = []

    class Submitter:
        def submit_batch_file(self, path: str, **spec: Any) -> SimpleNamespace:
            submitted.append(path)
            return SimpleNamespace(id="job-stub")

    monkeypatch.setattr(commands, "_client", Submitter)
    args = argparse.Namespace(input="REQUESTS.JSONL", output=None, wait=False, json=False,
                              told_store=True, **{o.name: None for o in spec_options()})
    assert commands.cmd_submit(args) == commands.EXIT_OK
    assert submitted == ["REQUESTS.JSONL"]
