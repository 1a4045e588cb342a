"""The Python client for pipelines: `Client().submit("prompts.parquet", model="m").wait()`.

It talks to the object store directly and puts shards on the broker through
`workers.dispatch` (imported only when a job is submitted, so reading status or results
needs no Celery).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs import finalize, manifest, progress, results, retry, settings
from jobs.keys import validate_job_id
from jobs.planner import Shard
from jobs.spec import JobSpec
from jobs.store import Store, open_store
from jobs.submit import submit_job

TERMINAL_STATES = ("completed", "failed", "cancelled")


class Job:
    """A handle on one job in the store."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = validate_job_id(job_id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The manifest, with live row counts from the shards' progress while it runs."""
        state = manifest.load_manifest(self.client.store, self.id)
        if state["state"] not in TERMINAL_STATES:
            state["progress"] = progress.read_progress(self.client.store, self.id)
        return state

    def wait(self, progress: bool = False, poll_seconds: float = 1.0,
             timeout: float | None = None, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """Block until the job ends; with progress=True, draw a progress bar on stderr.

        check, if given, is called at each poll and may raise to stop waiting (the demo uses
        it to notice that its worker died)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar() if progress else None
        try:
            while True:
                status = self.status()
                if bar is not None:
                    bar.update(status)
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

    def cancel(self) -> dict[str, Any]:
        """Stop queued shards from starting and running ones at their next engine step.

        The job ends cancelled at once (even with no worker up to notice); rows already
        written stay, and a shard that was finishing as the cancel came still counts."""
        state = manifest.request_cancel(self.client.store, self.id)
        if state["state"] != "cancelling":
            return state  # it had already ended
        return finalize.finalize_if_complete(self.client.store, self.id) or state

    def retry(self) -> dict[str, Any]:
        """Run again the shards that have no results and the rows that failed for a
        transient reason (jobs/retry.py); returns what was queued (round None: nothing)."""
        from workers.dispatch import send_shard

        spec_queue = self.client.job_spec(self.id).queue
        shards_total = manifest.load_manifest(self.client.store, self.id)["counts"]["shards_total"]

        def enqueue(shard: int, attempt: int) -> None:
            send_shard(self.id, shard, shards_total, self.client.store_url, queue=spec_queue,
                       broker_url=self.client.broker_url, attempt=attempt)

        return retry.start_retry(self.client.store, self.id, enqueue)

    def results(self) -> pa.Table:
        """All result rows of the finished shards, in input order."""
        return results.merge_results(self.client.store, self.id)

    def download_results(self, out_path: str | Path) -> int:
        """Write the merged results to a local Parquet file; returns the row count."""
        return results.write_results_file(self.client.store, self.id, out_path)


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
        from workers.dispatch import enqueue_job

        job_spec = JobSpec(model=model, **spec)

        def enqueue(job_id: str, shards: list[Shard]) -> None:
            enqueue_job(job_id, len(shards), self.store_url, queue=job_spec.queue,
                        broker_url=self.broker_url)

        job_id, _created = submit_job(self.store, source, job_spec, enqueue)
        return Job(self, job_id)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def job_spec(self, job_id: str) -> JobSpec:
        from jobs.spec import load_spec

        return load_spec(self.store, validate_job_id(job_id))

    def jobs(self) -> list[dict[str, Any]]:
        """Summaries of every job in the store, newest first."""
        return manifest.list_manifests(self.store)


class ProgressBar:
    """Rows done / total with tokens/s and ETA, drawn by tqdm on stderr.

    While the job runs, tokens/s is measured here: the tokens the shards reported since the
    first poll that found it running (its model loaded), over the time since. (The running
    shards' own rates would read 0 for shards shorter than their reporting interval.) Once
    the job has ended, it is the job's figure, tokens per busy second, as `batchinfer
    status` prints it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="row", dynamic_ncols=True)
        self._clock = clock
        self._started: float | None = None
        self._tokens_by_shard: dict[int, int] = {}
        self._tokens_since_start = 0

    def _live_rate(self, live: dict[str, Any]) -> float:
        now = self._clock()
        for shard in live.get("shards", []):
            tokens, before = shard.get("tokens", 0), self._tokens_by_shard.get(shard["shard"])
            if self._started is not None:
                # A retry round rewrites a shard's progress from 0: all its tokens are new.
                fresh = before is None or tokens < before
                self._tokens_since_start += tokens if fresh else tokens - before
            self._tokens_by_shard[shard["shard"]] = tokens
        if self._started is None:
            self._started = now
        elapsed = now - self._started
        return self._tokens_since_start / elapsed if elapsed > 0 else 0.0

    def update(self, status: dict[str, Any]) -> None:
        counts = status.get("counts", {})
        live = status.get("progress") or {}
        total = counts.get("total_rows", 0)
        done = live.get("rows_done", counts.get("succeeded_rows", 0) + counts.get("failed_rows", 0))
        if status["state"] in TERMINAL_STATES:
            done = counts.get("succeeded_rows", 0) + counts.get("failed_rows", 0)
        self._bar.total = total
        self._bar.n = min(done, total) if total else done
        if status["state"] in TERMINAL_STATES:
            rate = status.get("usage", {}).get("tokens_per_second", 0.0)
        elif status["state"] in ("validating", "queued"):
            rate = 0.0
        else:
            rate = self._live_rate(live)
        self._bar.set_postfix_str(f"{status['state']}, {rate:.0f} tok/s", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
