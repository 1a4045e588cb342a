"""Run one shard of a job through an engine and write its results, errors and usage.

Exactly once: a shard whose results part exists is done, and running it again does
nothing. The results part is written last, after the errors part and the usage record,
so its existence means the whole shard is in the store. On cancel nothing is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine import LLM, RequestOutput, SamplingParams
from jobs import keys, settings
from jobs.planner import Shard, plan_shards, row_group_bounds
from jobs.progress import write_progress
from jobs.spec import (
    ERROR_COLUMN,
    InputLayout,
    JobSpec,
    input_layout,
    load_spec,
    sampling_kwargs,
)
from jobs.store import Store
from jobs.tables import count_rows, put_table
from jobs.usage import batch_fill, make_usage_record, write_usage

PROGRESS_SECONDS = 2.0
# should_cancel may read the store, so it is asked at most this often, not at every step.
CANCEL_CHECK_SECONDS = 1.0
# Requests handed to the engine ahead of its running batch, per sequence slot: enough to
# refill the batch as sequences finish, few enough to keep memory bounded.
IN_FLIGHT_PER_SEQ_SLOT = 2
READ_BATCH_ROWS = 1024

ProgressCallback = Callable[[int, int, float, float], None]


def run_shard(store: Store, job_id: str, shard_index: int, llm: LLM, *, worker: str = "",
              on_progress: ProgressCallback | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run shard shard_index of job job_id through llm; returns a summary.

    Summary: shard, rows, succeeded, failed, prompt_tokens, completion_tokens, tokens,
    skipped (the shard was already done), cancelled (should_cancel said stop; nothing
    was written). on_progress(done, total, tokens_per_second, batch_fill) is called about
    every PROGRESS_SECONDS, when the shard's progress object is rewritten.
    """
    if store.exists(keys.result_key(job_id, shard_index)):
        return _already_done(store, job_id, shard_index)
    spec = load_spec(store, job_id)
    with store.open_read(keys.input_key(job_id)) as file:
        parquet = pq.ParquetFile(file)
        plan = plan_shards(parquet.metadata, spec.shard_size)
        if not 0 <= shard_index < len(plan):
            raise ValueError(f"job {job_id} has {len(plan)} shards, not shard {shard_index}")
        shard = plan[shard_index]
        layout = input_layout(parquet.schema_arrow, spec)
        rows = read_shard_rows(parquet, shard)

    run = _ShardRun(store, job_id, shard, llm, spec, layout, rows, on_progress, should_cancel)
    if not run.generate():
        return _summary(shard_index, rows=shard.num_rows, cancelled=True)
    return run.write(worker)


def read_shard_rows(parquet: pq.ParquetFile, shard: Shard) -> pa.Table:
    """The shard's rows, reading only the row groups that hold them, in batches."""
    bounds = row_group_bounds(parquet.metadata)
    groups = [i for i, (start, end) in enumerate(bounds)
              if start < shard.row_end and end > shard.row_start]
    position = bounds[groups[0]][0]  # file row of the next batch's first row
    pieces = []
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups):
        first = max(shard.row_start - position, 0)
        last = min(shard.row_end - position, batch.num_rows)
        if last > first:
            pieces.append(batch.slice(first, last - first))
        position += batch.num_rows
        if position >= shard.row_end:
            break
    return pa.Table.from_batches(pieces, schema=parquet.schema_arrow)


def _summary(shard: int, *, rows: int, succeeded: int = 0, failed: int = 0,
             prompt_tokens: int = 0, completion_tokens: int = 0, skipped: bool = False,
             cancelled: bool = False) -> dict[str, Any]:
    return {"shard": shard, "rows": rows, "succeeded": succeeded, "failed": failed,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "tokens": prompt_tokens + completion_tokens, "skipped": skipped,
            "cancelled": cancelled}


def _already_done(store: Store, job_id: str, shard_index: int) -> dict[str, Any]:
    succeeded = count_rows(store, keys.result_key(job_id, shard_index))
    error_key = keys.error_key(job_id, shard_index)
    failed = count_rows(store, error_key) if store.exists(error_key) else 0
    return _summary(shard_index, rows=succeeded + failed, succeeded=succeeded, failed=failed,
                    skipped=True)


def _prompt_text(value: Any, layout: InputLayout, llm: LLM) -> str:
    """The prompt for one row's text or messages value; ValueError says why there is none."""
    if not layout.is_messages:
        if value is None:
            raise ValueError("prompt is null")
        if not value:
            raise ValueError("prompt is empty")
        return value
    if not value:
        raise ValueError("messages are null or empty")
    for number, message in enumerate(value):
        if message is None or not message.get("role") or message.get("content") is None:
            raise ValueError(f"message {number} has no role or no content")
    try:
        return llm.tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # the template is the model's code: any failure is this row's
        raise ValueError(f"chat template failed: {error}") from None


class _ShardRun:
    """One shard's trip through the engine, then the writing of what came out."""

    def __init__(self, store: Store, job_id: str, shard: Shard, llm: LLM, spec: JobSpec,
                 layout: InputLayout, rows: pa.Table, on_progress: ProgressCallback | None,
                 should_cancel: Callable[[], bool] | None) -> None:
        self.store, self.job_id, self.shard, self.llm = store, job_id, shard, llm
        self.spec, self.layout, self.rows = spec, layout, rows
        self.on_progress, self.should_cancel = on_progress, should_cancel
        self.outputs: dict[int, RequestOutput] = {}  # by position in the shard
        self.errors: dict[int, str] = {}
        self.tokens_done = 0
        # Set when generate() starts and ends.
        self.stats_before: dict[str, Any] = {}
        self.started_at = self.finished_at = datetime.now(timezone.utc)
        self.start = time.monotonic()
        self.busy_seconds = 0.0

    def _requests(self) -> Iterator[tuple[int, str | None, SamplingParams | None, str | None]]:
        """(position, prompt, params, error) per row; error set when the row cannot run."""
        position = 0
        for batch in self.rows.to_batches(max_chunksize=READ_BATCH_ROWS):
            texts = batch.column(self.layout.text_column).to_pylist()
            overrides = {name: batch.column(name).to_pylist()
                         for name in self.layout.override_columns}
            for offset, text in enumerate(texts):
                row_values = {name: values[offset] for name, values in overrides.items()}
                yield (position, *self._prepare(text, row_values))
                position += 1

    def _prepare(self, text: Any, overrides: dict[str, Any]
                 ) -> tuple[str | None, SamplingParams | None, str | None]:
        try:
            prompt = _prompt_text(text, self.layout, self.llm)
        except ValueError as error:
            return None, None, str(error)
        try:
            return prompt, SamplingParams(**sampling_kwargs(self.spec, overrides)), None
        except ValueError as error:
            return None, None, f"invalid sampling override: {error}"

    def generate(self) -> bool:
        """Stream the rows through the engine; False if cancelled (in-flight rows aborted)."""
        llm = self.llm
        limit = IN_FLIGHT_PER_SEQ_SLOT * llm.scheduler.max_num_seqs
        requests = self._requests()
        in_flight: dict[str, int] = {}
        more_rows = True
        self.stats_before = llm.stats()
        self.started_at = datetime.now(timezone.utc)
        self.start = time.monotonic()
        last_progress = self.start
        last_cancel_check = -math.inf  # ask before the first step too
        self._report_progress()
        try:
            while True:
                while more_rows and len(in_flight) < limit:
                    item = next(requests, None)
                    if item is None:
                        more_rows = False
                        break
                    position, prompt, params, error = item
                    if error is None:
                        request_id = f"{self.job_id}-{self.shard.index:05d}-{position}"
                        try:
                            llm.add_request(request_id, prompt, params)
                            in_flight[request_id] = position
                            continue
                        except ValueError as rejected:  # can never run: too long, say
                            error = str(rejected)
                    self.errors[position] = error
                if not in_flight:
                    break
                now = time.monotonic()
                if self.should_cancel and now - last_cancel_check >= CANCEL_CHECK_SECONDS:
                    last_cancel_check = now
                    if self.should_cancel():
                        return False
                for output in llm.step():
                    position = in_flight.pop(output.request_id, None)
                    if position is None:
                        continue  # a request left over from an earlier, aborted shard
                    if output.finish_reason in ("stop", "length"):
                        self.outputs[position] = output
                        self.tokens_done += output.prompt_tokens + output.completion_tokens
                    else:
                        self.errors[position] = output.error or f"request {output.finish_reason}"
                if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                    last_progress = time.monotonic()
                    self._report_progress()
        finally:
            # Empty unless cancelled or failing: free the engine for the next shard.
            for request_id in in_flight:
                llm.abort_request(request_id)
        self.busy_seconds = time.monotonic() - self.start
        self.finished_at = datetime.now(timezone.utc)
        self._report_progress()
        return True

    def _report_progress(self) -> None:
        elapsed = time.monotonic() - self.start
        tokens_per_second = self.tokens_done / elapsed if elapsed > 0 else 0.0
        fill = batch_fill(self.stats_before, self.llm.stats())
        done = len(self.outputs) + len(self.errors)
        write_progress(self.store, self.job_id, self.shard.index, done, self.shard.num_rows,
                       tokens_per_second, fill)
        if self.on_progress is not None:
            self.on_progress(done, self.shard.num_rows, tokens_per_second, fill)

    def _take(self, column: str, positions: list[int]) -> pa.ChunkedArray:
        # Typed indices: an empty Python list would be a null-typed array `take` refuses.
        return self.rows[column].take(pa.array(positions, pa.int64()))

    def _ids(self, positions: list[int]) -> pa.Array | pa.ChunkedArray:
        if self.layout.id_column is not None:
            return self._take(self.layout.id_column, positions)
        return pa.array([self.shard.row_start + p for p in positions], pa.int64())

    def write(self, worker: str) -> dict[str, Any]:
        """Write errors, usage, then results (last: its existence marks the shard done)."""
        store, job_id, index = self.store, self.job_id, self.shard.index
        id_column = self.layout.result_id_column
        error_positions = sorted(self.errors)
        if error_positions:
            put_table(store, keys.error_key(job_id, index), pa.table({
                id_column: self._ids(error_positions),
                ERROR_COLUMN: pa.array([self.errors[p] for p in error_positions], pa.string()),
            }))
        else:  # an earlier attempt's errors must not be counted with this attempt's results
            store.delete(keys.error_key(job_id, index))

        positions = sorted(self.outputs)
        outputs = [self.outputs[p] for p in positions]
        prompt_tokens = sum(o.prompt_tokens for o in outputs)
        completion_tokens = sum(o.completion_tokens for o in outputs)
        write_usage(store, make_usage_record(
            job_id=job_id, shard=index, model=self.spec.model,
            quantization=self.llm.quantization, worker=worker, device=str(self.llm.device),
            rows=self.shard.num_rows, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=sum(o.cached_tokens for o in outputs),
            started_at=self.started_at, finished_at=self.finished_at,
            busy_seconds=self.busy_seconds,
            mean_batch_fill=batch_fill(self.stats_before, self.llm.stats()),
            hourly_usd=settings.gpu_hourly_usd()))

        columns = {id_column: self._ids(positions)}
        for name in self.layout.passthrough_columns:
            columns[name] = self._take(name, positions)
        columns.update(
            output=pa.array([o.text for o in outputs], pa.string()),
            finish_reason=pa.array([o.finish_reason for o in outputs], pa.string()),
            prompt_tokens=pa.array([o.prompt_tokens for o in outputs], pa.int64()),
            completion_tokens=pa.array([o.completion_tokens for o in outputs], pa.int64()),
            cached_tokens=pa.array([o.cached_tokens for o in outputs], pa.int64()),
        )
        put_table(store, keys.result_key(job_id, index), pa.table(columns))
        return _summary(index, rows=self.shard.num_rows, succeeded=len(positions),
                        failed=len(error_positions), prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens)
