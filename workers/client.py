"""The Python client for pipelines: `Client().submit("prompts.parquet", model="m").wait()`.

It reads and writes jobs in the object store through jobs/, and puts their shards on the
queue through workers/dispatch.py.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs import delete, finalize, manifest, progress, results, retry, settings
from jobs.errors import UserError
from jobs.keys import validate_job_id
from jobs.manifest import TERMINAL_STATES, JobState
from jobs.openai_requests import parse_batch_file
from jobs.openai_responses import ResponseRenderer, unfinished_code, write_lines
from jobs.planner import Shard
from jobs.spec import DEFAULT_QUEUE, JobSpec, load_spec
from jobs.store import Store, open_store
from jobs.submit import submit_job
from workers.dispatch import enqueue_job, queue_consumers, send_shard
from workers.progress_bar import ProgressBar

# How often a job that stays queued is checked for a worker on its queue.
WORKER_CHECK_SECONDS = 5.0

log = logging.getLogger(__name__)


class Job:
    """A handle on one job in the store."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = validate_job_id(job_id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The manifest; while the job runs, with the shards' live progress under "progress"
        and counts that move as shards finish (rows done, shards done, an ETA)."""
        return progress.with_live_progress(
            self.client.store, manifest.load_manifest(self.client.store, self.id))

    def worker_notice(self) -> str | None:
        """What to do when no worker consumes this job's queue (None: one does)."""
        queue = self.client.job_spec(self.id).queue
        if queue_consumers(queue, broker_url=self.client.broker_url):
            return None
        start = "batchinfer worker" + (f" --queues {queue}" if queue else "")
        return f"no worker is consuming queue {queue or DEFAULT_QUEUE}: start one with `{start}`"

    def wait(self, progress: bool = False, poll_seconds: float = 1.0,
             timeout: float | None = None, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """Block until the job ends; with progress=True, draw a progress bar on stderr.

        A job that stays queued is checked for a worker on its queue every
        WORKER_CHECK_SECONDS; without one, the bar (or, without a bar, a logged warning)
        says how to start one. check, if given, is called at each poll and may raise to stop
        waiting (the demo uses it to notice that its worker died)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar() if progress else None
        next_worker_check = time.monotonic() + WORKER_CHECK_SECONDS
        notice = None
        try:
            while True:
                status = self.status()
                if status["state"] != JobState.QUEUED:
                    notice = None
                elif time.monotonic() >= next_worker_check:
                    next_worker_check = time.monotonic() + WORKER_CHECK_SECONDS
                    fresh = self.worker_notice()
                    if fresh and fresh != notice and bar is None:
                        log.warning("job %s: %s", self.id, fresh)
                    notice = fresh
                if bar is not None:
                    bar.update(status, notice)
                if status["state"] in TERMINAL_STATES:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {status['state']} after {timeout}s")
                if check is not None:
                    check()
                time.sleep(poll_seconds)
        finally:
            if bar is not None:
                bar.close()

    def cancel(self, by: str = "the Python client") -> dict[str, Any]:
        """Stop queued shards from starting and running ones at their next engine step.

        The job ends cancelled at once (even with no worker up to notice), its reason saying
        who cancelled it (user@host with `by`) and when; rows already written stay, and a
        shard that was finishing as the cancel came still counts."""
        state = manifest.request_cancel(self.client.store, self.id, by=f"{_user()} with {by}")
        if state["state"] != JobState.CANCELLING:
            return state  # it had already ended
        return finalize.finalize_if_complete(self.client.store, self.id) or state

    def retry(self) -> dict[str, Any]:
        """Run again the shards that have no results and the rows that failed for a
        transient reason (jobs/retry.py); returns what was queued (round None: nothing)."""
        spec_queue = self.client.job_spec(self.id).queue
        shards_total = manifest.load_manifest(self.client.store, self.id)["counts"]["shards_total"]

        def enqueue(shard: int, attempt: int) -> None:
            send_shard(self.id, shard, shards_total, self.client.store_url, queue=spec_queue,
                       broker_url=self.client.broker_url, attempt=attempt)

        return retry.start_retry(self.client.store, self.id, enqueue)

    def errors(self) -> pa.Table:
        """The rows that failed, (id, error, error_kind), in input order; empty if none."""
        return results.errors_table(self.client.store, self.id)

    def download_errors(self, out_path: str | Path) -> int:
        """Write the failed rows to a local Parquet file; returns the row count."""
        return results.write_tables_file([self.errors()], out_path)

    def delete(self) -> None:
        """Delete the job's objects from the store (not its usage records); UserError if it
        is still going."""
        delete.delete_job(self.client.store, self.id)

    def download_openai_lines(self, out_path: str | Path, errors: bool = False) -> int:
        """Write the job's results as OpenAI Batch output lines (errors=True: its error
        lines, with the requests a cancelled or failed job never ran) to a local JSONL
        file; returns the line count."""
        renderer = ResponseRenderer(self.client.store, self.id)
        state = manifest.load_manifest(self.client.store, self.id)["state"]
        lines = (renderer.error_lines(unfinished_code(state)) if errors
                 else renderer.output_lines())
        return write_lines(lines, out_path)

    def results(self) -> pa.Table:
        """All result rows of the finished shards, in input order."""
        return results.merge_results(self.client.store, self.id)

    def download_results(self, out_path: str | Path) -> int:
        """Write the merged results to a local Parquet file; returns the row count."""
        return results.write_results_file(self.client.store, self.id, out_path)


def _user() -> str:
    """user@host of this process, for the record of who cancelled a job."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name: a container without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


class Client:
    """Submit and follow jobs. URLs default to the environment's (BATCHINFER_STORE_URL,
    BATCHINFER_BROKER_URL), which default to the embedded local ones."""

    def __init__(self, store_url: str | None = None, broker_url: str | None = None) -> None:
        self.store_url = settings.absolute_store_url(store_url) if store_url else settings.store_url()
        self.broker_url = broker_url
        self.store: Store = open_store(self.store_url)

    def submit(self, source: str | Path | pa.Table, model: str, **spec: Any) -> Job:
        """Validate the input, upload it, and queue its shards. spec: the JobSpec fields.

        With idempotency_key="...", a key already used returns the job it created (even
        when two submits race) instead of creating another."""
        job_spec = JobSpec(model=model, **spec)

        def enqueue(job_id: str, shards: list[Shard]) -> None:
            enqueue_job(job_id, len(shards), self.store_url, queue=job_spec.queue,
                        broker_url=self.broker_url)

        job_id, _created = submit_job(self.store, source, job_spec, enqueue)
        return Job(self, job_id)

    def submit_batch_file(self, path: str | Path, **spec: Any) -> Job:
        """Submit an OpenAI Batch input file (JSONL request lines, jobs/openai_requests.py):
        the model and sampling come from its lines; spec: other JobSpec fields (shard
        size, queue, ...). A file that cannot run is a UserError listing why."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror}") from None
        requests = parse_batch_file(data)
        model = spec.pop("model", None)
        if model is not None and model != requests.model:
            raise UserError(f"--model {model!r} differs from the model the lines name, "
                            f"{requests.model!r}")
        return self.submit(requests.table, **{**requests.job_settings(), **spec})

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def job_spec(self, job_id: str) -> JobSpec:
        return load_spec(self.store, validate_job_id(job_id))

    def jobs(self) -> list[dict[str, Any]]:
        """Summaries of every job in the store, newest first."""
        return manifest.list_manifests(self.store)
