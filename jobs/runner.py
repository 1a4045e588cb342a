"""Run one shard of a job through an engine and write its results, errors and usage.

Exactly once: a shard whose results part exists is done, and running it again does
nothing. The results part is written last, after the errors part and the usage record,
so its existence means the whole shard is in the store. On cancel nothing is written but
progress. Every run writes the shard's progress object before its errors part, so a run
that creates the progress object knows that no earlier run left an errors part to remove.

A retry round (attempt N >= 1, see jobs/retry.py) runs only the shard's rows that failed
for a transient reason, into parts of their own (jobs/outcomes.py says how they count).
Running out of device memory cuts the batch (jobs/oom_backoff.py).

The engine is an LLM of the shard's own, or a SharedClient (engine/shared.py): one stream
into an LLM that another shard, in another thread, feeds at the same time. The runner's
calls are the same for both; the differences are busy time (a client's share of the
engine's steps, not the wall time both shards overlap in) and that an OOM reaches every
shard with requests in the failed step, each of which takes back only its own (a shard's
one request in a step shared with others' is tried again before it counts as alone).
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from engine import LLM, RequestOutput, SamplingParams
from engine.shared import SharedClient
from jobs import keys, limits, settings
from jobs.faults import is_out_of_memory
from jobs.input_file import InputLayout, input_layout
from jobs.manifest import load_manifest
from jobs.oom_backoff import OomBackoff
from jobs.outcomes import ErrorKind, list_outcomes, transient_ids
from jobs.planner import Shard, plan_shards
from jobs.progress import write_progress
from jobs.shard_input import read_shard_rows, row_requests, select_rows
from jobs.shard_tables import errors_part, results_part
from jobs.spec import JobSpec, load_spec
from jobs.store import Store
from jobs.tables import count_input_rows, count_rows, put_table
from jobs.usage import BatchFigures, make_usage_record, write_usage

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 2.0
# should_cancel may read the store, so it is asked at most this often, not at every step.
CANCEL_CHECK_SECONDS = 1.0
# Requests handed to the engine ahead of its running batch, per sequence slot: enough to
# refill the batch as sequences finish, few enough to keep memory bounded.
IN_FLIGHT_PER_SEQ_SLOT = 2
# Numbers every shard run in this process, for its request ids: a cancelled run's aborted
# requests come out of the engine's next step(), which may be the first step of a rerun of
# the same shard on the same engine (a retry after a cancel). Were the ids the same, those
# outputs would be taken for the rerun's rows, as "request aborted" errors.
_RUN_NUMBERS = itertools.count()

ProgressCallback = Callable[[int, int, float, float], None]
# A shard's engine: its own, or its stream into one shared with other shards.
Engine = LLM | SharedClient


@dataclass
class ShardSummary:
    """What became of one run of a shard (what its task returns, as a dict)."""

    shard: int
    attempt: int = 0
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    skipped: bool = False  # its part existed already: nothing ran
    cancelled: bool = False  # the job was cancelled: nothing was written
    oom_retries: int = 0  # times the batch was cut because memory ran out
    error: str | None = None  # its outcome could not even be recorded in the store

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens}


def run_shard(store: Store, job_id: str, shard_index: int, llm: Engine, *, attempt: int = 0,
              spec: JobSpec | None = None, worker: str = "",
              on_progress: ProgressCallback | None = None,
              should_cancel: Callable[[], bool] | None = None) -> ShardSummary:
    """Run shard shard_index of job job_id through llm (an LLM, or a SharedClient).

    attempt 0 runs the whole shard; attempt N >= 1 (retry round N) runs again only its rows
    that failed for a transient reason in earlier attempts. spec: the job's spec, where the
    caller has read it already (else it is read here). on_progress(done, total,
    tokens_per_second, occupancy) is called about every PROGRESS_SECONDS, when the
    shard's progress object is rewritten, and once the rows are done. should_cancel is
    asked about every CANCEL_CHECK_SECONDS while rows run, the first time after that
    long: the caller asks before it starts the shard.
    """
    if store.exists(keys.result_key(job_id, shard_index, attempt)):
        return _already_done(store, job_id, shard_index, attempt)
    retry_ids = None
    if attempt:
        outcome = list_outcomes(store, job_id).get(shard_index)
        if outcome is None or not outcome.done:
            raise ValueError(f"shard {shard_index} of job {job_id} has not run yet; "
                             f"it cannot be retried row by row")
        retry_ids = transient_ids(store, outcome, before=attempt)
    spec = spec or load_spec(store, job_id)
    with store.open_read(keys.input_key(job_id)) as file:
        metadata, plan = _input_plan(store, job_id, spec, file)
        if not 0 <= shard_index < len(plan):
            raise ValueError(f"job {job_id} has {len(plan)} shards, not shard {shard_index}")
        shard = plan[shard_index]
        parquet = pq.ParquetFile(file, metadata=metadata)
        layout = input_layout(parquet.schema_arrow, spec)
        rows = read_shard_rows(parquet, shard)
    row_numbers = pa.array(range(shard.row_start, shard.row_end), pa.int64())
    if retry_ids is not None:
        rows, row_numbers = select_rows(rows, row_numbers, layout, retry_ids)

    run = _ShardRun(store, job_id, shard, attempt, llm, spec, layout, rows, row_numbers,
                    on_progress, should_cancel)
    if not run.generate():
        return ShardSummary(shard_index, attempt, rows=rows.num_rows, cancelled=True,
                            oom_retries=run.backoff.retries)
    return run.write(worker)


# A job's input never changes (job ids are never reused) and a worker runs many of its
# shards, so its footer, which grows with the input's row groups, is read and planned once
# per process rather than once per shard: (store URL, job id) -> (footer, shards).
_INPUT_PLANS: OrderedDict[tuple[str, str], tuple[pq.FileMetaData, list[Shard]]] = OrderedDict()
INPUT_PLANS_KEPT = 2
_INPUT_PLANS_LOCK = threading.Lock()


def _input_plan(store: Store, job_id: str, spec: JobSpec, file: BinaryIO
                ) -> tuple[pq.FileMetaData, list[Shard]]:
    """The job's input footer and shard plan; file: the input, opened, read if not known."""
    key = (store.url, job_id)
    with _INPUT_PLANS_LOCK:
        known = _INPUT_PLANS.get(key)
        if known is not None:
            _INPUT_PLANS.move_to_end(key)
            return known
    metadata = pq.ParquetFile(file).metadata
    known = metadata, plan_shards(metadata, spec.shard_size)
    with _INPUT_PLANS_LOCK:
        _INPUT_PLANS[key] = known
        while len(_INPUT_PLANS) > INPUT_PLANS_KEPT:
            _INPUT_PLANS.popitem(last=False)
    return known


def _already_done(store: Store, job_id: str, shard_index: int, attempt: int) -> ShardSummary:
    succeeded = count_input_rows(store, keys.result_key(job_id, shard_index, attempt))
    error_key = keys.error_key(job_id, shard_index, attempt)
    failed = count_rows(store, error_key) if store.exists(error_key) else 0
    return ShardSummary(shard_index, attempt, rows=succeeded + failed, succeeded=succeeded,
                        failed=failed, skipped=True)


class _ShardRun:
    """One shard's trip through the engine, then the writing of what came out."""

    def __init__(self, store: Store, job_id: str, shard: Shard, attempt: int, llm: Engine,
                 spec: JobSpec, layout: InputLayout, rows: pa.Table, row_numbers: pa.Array,
                 on_progress: ProgressCallback | None,
                 should_cancel: Callable[[], bool] | None) -> None:
        self.store, self.job_id, self.shard, self.attempt = store, job_id, shard, attempt
        self.llm, self.spec, self.layout = llm, spec, layout
        self.rows, self.row_numbers = rows, row_numbers
        self.on_progress, self.should_cancel = on_progress, should_cancel
        self.outputs: dict[int, RequestOutput] = {}  # by position in self.rows
        self.errors: dict[int, tuple[str, str]] = {}  # position -> (reason, kind)
        self.tokens_done = 0
        self.backoff = OomBackoff(IN_FLIGHT_PER_SEQ_SLOT * llm.engine_config.max_num_seqs)
        # Rows that ran out of memory as the shard's only request, beside another shard's.
        self.spared_once: set[int] = set()
        self.max_chars = limits.max_prompt_chars()
        self.request_prefix = f"{job_id}-{shard.index:05d}-{attempt}-{next(_RUN_NUMBERS)}"
        # Set when generate() starts and ends.
        self.stats_before: dict[str, Any] = {}
        self.started_at = self.finished_at = datetime.now(UTC)
        self.start = time.monotonic()
        self.busy_seconds = 0.0
        self._client_busy_before = 0.0  # a SharedClient's busy_seconds when generate() started
        # Whether no earlier run of the shard wrote its progress object, and so none left an
        # errors part (each writes the one before the other); None until the first write.
        self.first_run: bool | None = None

    def generate(self) -> bool:
        """Stream the rows through the engine; False if cancelled (in-flight rows aborted)."""
        llm, backoff = self.llm, self.backoff
        requests = row_requests(self.rows, self.layout, self.spec, self.llm.tokenizer,
                                self.max_chars)
        # Rows taken back from the engine after it ran out of memory, to add again first.
        pending: list[tuple[int, str, SamplingParams]] = []
        prepared: dict[int, tuple[str, SamplingParams]] = {}  # in flight, to take back
        in_flight: dict[str, int] = {}
        request_number = 0
        more_rows = True
        self.stats_before = llm.stats()
        self.started_at = datetime.now(UTC)
        self.start = time.monotonic()
        if isinstance(llm, SharedClient):
            self._client_busy_before = llm.busy_seconds
        last_progress = last_cancel_check = self.start
        # Nothing is done yet: the store learns of the shard's progress when something is
        # (a shard shorter than PROGRESS_SECONDS writes it once, when it is done).
        self._report_progress(to_store=False)
        try:
            while True:
                while len(in_flight) < backoff.cap and (pending or more_rows):
                    if pending:
                        position, prompt, params = pending.pop(0)
                        error = None
                    else:
                        item = next(requests, None)
                        if item is None:
                            more_rows = False
                            break
                        position, prompt, params, error = item
                    if error is None:
                        # A fresh id per try: an aborted try's output may still come out.
                        request_id = f"{self.request_prefix}-{position}-{request_number}"
                        request_number += 1
                        try:
                            llm.add_request(request_id, prompt, params)
                            in_flight[request_id] = position
                            prepared[position] = (prompt, params)
                            continue
                        except ValueError as rejected:  # can never run: too long, say
                            error = str(rejected)
                    self.errors[position] = (error, ErrorKind.INVALID)
                if not in_flight:
                    break
                now = time.monotonic()
                if self.should_cancel and now - last_cancel_check >= CANCEL_CHECK_SECONDS:
                    last_cancel_check = now
                    if self._cancel_requested():
                        return False
                finished, oom_reason = self._step()
                if oom_reason is not None:
                    pending = self._back_off(oom_reason, in_flight, prepared) + pending
                    continue
                for output in finished:
                    position = in_flight.pop(output.request_id, None)
                    if position is None:
                        continue  # a request left over from an earlier, aborted try
                    prepared.pop(position, None)
                    backoff.row_finished()
                    self._collect(position, output)
                if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                    last_progress = time.monotonic()
                    self._report_progress()
        finally:
            # Empty unless cancelled or failing: free the engine for the next shard.
            for request_id in in_flight:
                llm.abort_request(request_id)
        self.busy_seconds = self._engine_seconds()
        self.finished_at = datetime.now(UTC)
        self._report_progress()
        return True

    def _engine_seconds(self) -> float:
        """The engine's time spent on this shard: with a shared engine, the shard's share of
        its steps (the shards' wall times overlap, and would count the engine twice)."""
        if isinstance(self.llm, SharedClient):
            return self.llm.busy_seconds - self._client_busy_before
        return time.monotonic() - self.start

    def _step(self) -> tuple[list[RequestOutput], str | None]:
        """One engine step: (finished outputs, None), or ([], why) if memory ran out."""
        try:
            return self.llm.step(), None
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            # Only the text leaves this frame: the error's traceback holds the step's tensors.
            return [], f"out of memory: {type(error).__name__}: {error}"

    def _back_off(self, reason: str, in_flight: dict[str, int],
                  prepared: dict[int, tuple[str, SamplingParams]]
                  ) -> list[tuple[int, str, SamplingParams]]:
        """After running out of memory: the requests to add again (at a lower cap), or, for
        one that ran out alone, an error row and none."""
        taken_back = self._take_back(in_flight, prepared)
        if len(taken_back) > 1 or self._spares_lone_row(taken_back[0][0]):
            cap = self.backoff.batch_ran_out(len(taken_back))
            log.warning("shard %s: %s; %d requests were in flight, now at most %d",
                        self.shard.index, reason, len(taken_back), cap)
            return taken_back
        position = taken_back[0][0]
        log.warning("shard %s: row %d %s, even alone", self.shard.index, position, reason)
        self.backoff.row_ran_out_alone(reason)
        self.errors[position] = (f"{reason} (even alone)", ErrorKind.TRANSIENT)
        return []

    def _spares_lone_row(self, position: int) -> bool:
        """Whether the shard's one request in the failed step is tried again rather than
        counted as running out alone: always while other shards had several requests in
        the shared engine (they cut their batches), once where they had one."""
        others = self.llm.others_in_failed_step if isinstance(self.llm, SharedClient) else 0
        if others > 1:
            return True
        if others == 0 or position in self.spared_once:
            return False
        self.spared_once.add(position)
        return True

    def _collect(self, position: int, output: RequestOutput) -> None:
        if output.finish_reason.completed:
            self.outputs[position] = output
            self.tokens_done += output.prompt_tokens + output.generated_tokens
        else:  # the engine failed on this row at run time: worth another try
            self.errors[position] = (output.error or f"request {output.finish_reason}",
                                     ErrorKind.TRANSIENT)

    def _take_back(self, in_flight: dict[str, int],
                   prepared: dict[int, tuple[str, SamplingParams]]
                   ) -> list[tuple[int, str, SamplingParams]]:
        """Abort every request in flight (the engine is left empty and consistent) and return
        them, in row order, to be added again."""
        for request_id in in_flight:
            self.llm.abort_request(request_id)
        positions = sorted(in_flight.values())
        in_flight.clear()
        if isinstance(self.llm, LLM):
            self.llm.step()  # hands back the aborted requests' outputs; runs nothing
        # A SharedClient's aborts are its own at once (its next step() hands them out and
        # they are ignored, ids being fresh per try): a step here would run the other
        # shards' requests too, and could run out of memory again.
        gc.collect()
        _release_device_memory(self.llm)
        return [(p, *prepared.pop(p)) for p in positions]

    def _cancel_requested(self) -> bool:
        """Ask should_cancel; a failure to ask (the store unreachable) means "go on"."""
        try:
            return bool(self.should_cancel())
        except Exception as error:
            log.warning("shard %s: could not check for a cancel: %s", self.shard.index,
                        settings.mask_secrets(str(error)))
            return False

    def _report_progress(self, to_store: bool = True) -> None:
        """Tell on_progress, and write the shard's progress object (to_store); progress is
        advice, so a failure to write it only logs."""
        done, tokens_per_second, occupancy = self._progress_figures()
        if to_store:
            try:
                self._write_progress(done, tokens_per_second, occupancy)
            except Exception as error:
                log.warning("shard %s: progress not written: %s", self.shard.index,
                            settings.mask_secrets(str(error)))
        if self.on_progress is not None:
            self.on_progress(done, self.rows.num_rows, tokens_per_second, occupancy)

    def _progress_figures(self) -> tuple[int, float, float]:
        """(rows done, tokens per second, occupancy) so far."""
        elapsed = time.monotonic() - self.start
        tokens_per_second = self.tokens_done / elapsed if elapsed > 0 else 0.0
        occupancy = BatchFigures.between(self.stats_before, self.llm.stats()).occupancy
        return len(self.outputs) + len(self.errors), tokens_per_second, occupancy

    def _write_progress(self, done: int, tokens_per_second: float, occupancy: float) -> None:
        created = write_progress(self.store, self.job_id, self.shard.index, done,
                                 self.rows.num_rows, self.tokens_done, tokens_per_second,
                                 occupancy, failed=len(self.errors),
                                 first=self.first_run is None)
        if self.first_run is None:
            self.first_run = created

    def _created_day(self) -> date:
        """The day the job was created: the first an earlier run of the shard may have
        finished on (read only for a rerun)."""
        return date.fromisoformat(load_manifest(self.store, self.job_id)["created_at"][:10])

    def _take(self, column: str, positions: list[int]) -> pa.ChunkedArray:
        # Typed indices: an empty Python list would be a null-typed array `take` refuses.
        return self.rows[column].take(pa.array(positions, pa.int64()))

    def _ids(self, positions: list[int]) -> pa.Array | pa.ChunkedArray:
        if self.layout.id_column is not None:
            return self._take(self.layout.id_column, positions)
        return self.row_numbers.take(pa.array(positions, pa.int64()))

    def write(self, worker: str) -> ShardSummary:
        """Write errors, usage, then results (last: its existence marks the attempt done)."""
        store, job_id, index, attempt = self.store, self.job_id, self.shard.index, self.attempt
        id_column = self.layout.result_id_column
        error_positions = sorted(self.errors)
        error_key = keys.error_key(job_id, index, attempt)
        if self.first_run is None:  # its progress never reached the store: now, or fail
            self._write_progress(*self._progress_figures())
        if error_positions:
            put_table(store, error_key, errors_part(
                id_column, self._ids(error_positions), [self.errors[p] for p in error_positions]))
        elif not self.first_run:
            # An earlier run may have died after writing its errors part: those errors must
            # not be counted with this run's results. (A first run has none to remove.)
            store.delete(error_key)

        positions = sorted(self.outputs)
        outputs = [self.outputs[p] for p in positions]
        prompt_tokens = sum(o.prompt_tokens for o in outputs)
        completion_tokens = sum(o.generated_tokens for o in outputs)
        stats = self.llm.stats()
        write_usage(store, make_usage_record(
            job_id=job_id, shard=index, model=self.spec.model,
            quantization=self.llm.quantization, worker=worker, device=str(self.llm.device),
            rows=self.rows.num_rows, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=sum(o.cached_tokens for o in outputs),
            started_at=self.started_at, finished_at=self.finished_at,
            busy_seconds=self.busy_seconds,
            batch=BatchFigures.between(self.stats_before, stats),
            hourly_usd=settings.gpu_hourly_usd(), weight_bytes=stats.get("weight_bytes")),
            attempt=attempt, earlier_runs_since=None if self.first_run else self._created_day())

        passthrough = {name: self._take(name, positions)
                       for name in self.layout.passthrough_columns}
        overrides = self.layout.override_columns
        asked = {name: getattr(self.spec, name) is not None or name in overrides
                 for name in ("logprobs", "prompt_logprobs")}
        put_table(store, keys.result_key(job_id, index, attempt),
                  results_part(id_column, self._ids(positions), passthrough, outputs,
                               samples=self.spec.n > 1 or "n" in overrides, **asked))
        return ShardSummary(index, attempt, rows=self.rows.num_rows, succeeded=len(positions),
                            failed=len(error_positions), prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            oom_retries=self.backoff.retries)


def _release_device_memory(llm: Engine) -> None:
    """Give the CUDA caching allocator's free blocks back after running out of memory."""
    import torch

    if getattr(llm.device, "type", None) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
