"""A job's results and errors as OpenAI Batch output and error lines (JSONL).

Output lines, one per request that ran, in input order (OpenAI's own order is arbitrary):
`{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
"body": <chat.completion or text_completion>}, "error": null}`, the body's choices being
the request's samples. Error lines, in input order: a request that failed, with
`status_code` 400 (the request cannot run: kind "invalid") or 500 (the engine failed on
it), and, for a batch that stopped early (expired, cancelled, failed), every request that
did not run, with `response` null and `error.code` such as `batch_expired`.

Rendering is deterministic (ids are hashes of the job and the custom_id, `created` is the
job's end), so a file rendered twice is the same bytes. Any job renders: where the input
was Parquet, the custom_id is the row's id, and the endpoint follows from the prompt
column (messages: chat completions).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs import keys, results
from jobs.input_file import input_layout
from jobs.manifest import JobState, load_manifest
from jobs.outcomes import ERROR_COLUMN, ERROR_KIND_COLUMN, ErrorKind
from jobs.spec import JobSpec, load_spec
from jobs.store import Store

# What a request that never ran says, by how its batch ended.
UNFINISHED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window "
                     "expired.",
    "batch_cancelled": "This request was not executed: the batch was cancelled.",
    "batch_failed": "This request was not executed: the batch failed.",
}


def unfinished_code(state: str, expired: bool = False) -> str | None:
    """The error code of the requests that did not run, by how the job ended (None: it
    completed, so every request has results or an error)."""
    if state == JobState.CANCELLED:
        return "batch_expired" if expired else "batch_cancelled"
    return "batch_failed" if state == JobState.FAILED else None


def write_lines(lines: Iterable[bytes], out_path: str | Path) -> int:
    """Write lines to a local file that appears whole or not at all; returns their count."""
    count = 0
    with results.local_file_atomically(out_path) as temp, temp.open("wb") as file:
        for line in lines:
            file.write(line)
            count += 1
    return count


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


class ResponseRenderer:
    """The OpenAI lines of one job (read from the store when asked)."""

    def __init__(self, store: Store, job_id: str, model: str | None = None) -> None:
        self.store = store
        self.job_id = job_id
        self.spec: JobSpec = load_spec(store, job_id)
        manifest = load_manifest(store, job_id)
        self.model = model or manifest.get("model") or self.spec.model
        self.chat = self.spec.messages_column is not None
        stamp = manifest.get("finished_at") or manifest["created_at"]
        self.created = int(datetime.fromisoformat(stamp).timestamp())
        # The requests output_lines has rendered: what error_lines leaves out as done,
        # rather than reading the results again (a shard landing in between would be
        # in neither file).
        self.rendered: set[Any] | None = None

    def _ids(self, custom_id: str) -> tuple[str, str]:
        digest = hashlib.sha256(f"{self.job_id}\0{custom_id}".encode()).hexdigest()
        return f"batch_req_{digest[:32]}", f"req_{digest[32:64]}"

    def _read_input(self, column: str | None) -> tuple[list[Any], list[Any] | None]:
        """The input's ids (row numbers where it has no id column) and, if it has it,
        column's values."""
        with self.store.open_read(keys.input_key(self.job_id)) as file:
            parquet = pq.ParquetFile(file)
            layout = input_layout(parquet.schema_arrow, self.spec)
            wanted = [name for name in (layout.id_column, column)
                      if name is not None and name in parquet.schema_arrow.names]
            table = parquet.read(columns=wanted)
        ids = (table.column(layout.id_column).to_pylist() if layout.id_column
               else list(range(parquet.metadata.num_rows)))
        values = table.column(column).to_pylist() if column in table.column_names else None
        return ids, values

    def output_lines(self) -> Iterator[bytes]:
        """A line per request with results, in input order."""
        ids, per_row = self._read_input("logprobs")
        self.rendered = set()
        # How many alternatives each request asked for (the rows' own, else the job's).
        asked = (dict(zip(ids, per_row, strict=True)) if per_row is not None else {})
        for table in results.shard_tables(self.store, self.job_id):
            id_column = table.column_names[0]
            rows = table.to_pylist()
            for row_id, samples in groupby(rows, key=lambda row: row[id_column]):
                self.rendered.add(row_id)
                top = asked.get(row_id)
                yield _line(self._output(str(row_id), list(samples),
                                         self.spec.logprobs if top is None else top))

    def _output(self, custom_id: str, samples: list[dict[str, Any]],
                top: int | None) -> dict[str, Any]:
        line_id, request_id = self._ids(custom_id)
        first = samples[0]
        completion_tokens = sum(sample["completion_tokens"] for sample in samples)
        body = {
            "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id[4:]}",
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(sample, top) for sample in samples],
            "usage": {
                "prompt_tokens": first["prompt_tokens"],
                "completion_tokens": completion_tokens,
                "total_tokens": first["prompt_tokens"] + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": first["cached_tokens"]},
            },
        }
        return {"id": line_id, "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": body},
                "error": None}

    def _choice(self, sample: dict[str, Any], top: int | None) -> dict[str, Any]:
        tokens = sample.get("logprobs") if top is not None else None
        choice: dict[str, Any] = {"index": sample.get("sample_index") or 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": sample["output"],
                                 "refusal": None}
            choice["logprobs"] = (None if tokens is None else
                                  {"content": _chat_logprobs(tokens, top), "refusal": None})
        else:
            choice["text"] = sample["output"]
            choice["logprobs"] = None if tokens is None else _completion_logprobs(tokens, top)
        choice["finish_reason"] = sample["finish_reason"]
        return choice

    def error_lines(self, unfinished: str | None = None) -> Iterator[bytes]:
        """A line per failed request, in input order; unfinished (a key of
        UNFINISHED_MESSAGES): also one per request that has neither results nor an error,
        with that code. Results: those output_lines rendered, where it ran first (one
        reading of them for both files), else those in the store now."""
        errors = results.errors_table(self.store, self.job_id)
        failed = dict(zip(errors.column(0).to_pylist(),
                          zip(errors.column(ERROR_COLUMN).to_pylist(),
                              errors.column(ERROR_KIND_COLUMN).to_pylist(), strict=True),
                          strict=True))
        if unfinished is None:
            order = errors.column(0).to_pylist()
        else:
            order, _ = self._read_input(None)
            done = self.rendered if self.rendered is not None else {
                row_id for table in results.shard_tables(self.store, self.job_id)
                for row_id in table.column(0).to_pylist()}
            order = [row_id for row_id in order if row_id not in done]
        for row_id in order:
            if row_id in failed:
                yield _line(self._failed(str(row_id), *failed[row_id]))
            else:
                yield _line(self._unfinished(str(row_id), unfinished))

    def _failed(self, custom_id: str, reason: str, kind: str) -> dict[str, Any]:
        line_id, request_id = self._ids(custom_id)
        invalid = kind == ErrorKind.INVALID
        error = {"message": reason,
                 "type": "invalid_request_error" if invalid else "server_error",
                 "param": None, "code": None}
        return {"id": line_id, "custom_id": custom_id,
                "response": {"status_code": 400 if invalid else 500,
                             "request_id": request_id, "body": {"error": error}},
                "error": None}

    def _unfinished(self, custom_id: str, code: str | None) -> dict[str, Any]:
        assert code is not None
        line_id, _ = self._ids(custom_id)
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": UNFINISHED_MESSAGES[code]}}


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry["token"], "logprob": entry["logprob"],
            "bytes": list(entry["token"].encode())}


def _chat_logprobs(tokens: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    # A token's `top` list is ranked: its first `top` entries are the most likely; the
    # sampled token follows them when it ranks lower.
    return [{**_token(t), "top_logprobs": [_token(alt) for alt in t["top"][:top]]}
            for t in tokens]


def _completion_logprobs(tokens: list[dict[str, Any]], top: int) -> dict[str, Any]:
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t["token"])
    return {"tokens": [t["token"] for t in tokens],
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in t["top"][:top]}
                             for t in tokens],
            "text_offset": offsets}
