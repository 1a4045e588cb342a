"""The progress bar of a job being waited for: `batchinfer submit --wait`, `Job.wait(progress=True)`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from jobs.manifest import TERMINAL_STATES, JobState


class ProgressBar:
    """Rows done / total with the job's state, tokens/s and ETA, drawn by tqdm on stderr.

    While the job runs, tokens/s is measured here: the tokens the shards reported since the
    first poll that found it running (its model loaded), over the time since. (The running
    shards' own rates would read 0 for shards shorter than their reporting interval.) Once
    the job has ended, it is the job's figure, tokens per busy second, as `batchinfer
    status` prints it. The bar is drawn from the first update, once the total is known.
    """

    # tqdm's own rate and ETA would count from the bar's start, model load included.
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}{postfix}]"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._bar: Any = None
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

    def update(self, status: dict[str, Any], notice: str | None = None) -> None:
        """Redraw from a status; notice (no worker for the queue, say) replaces the rate."""
        counts = status.get("counts", {})
        live = status.get("progress") or {}
        ended = status["state"] in TERMINAL_STATES
        round_number = (status.get("retry") or {}).get("round") if not ended else None
        if round_number:  # a retry round's progress covers only the rows it runs again
            total, done = live.get("rows_total", 0), live.get("rows_done", 0)
        else:
            total = counts.get("total_rows", 0)
            done = counts.get("succeeded_rows", 0) + counts.get("failed_rows", 0)
        if self._bar is None:
            self._bar = tqdm(total=total, unit="row", dynamic_ncols=True,
                             bar_format=self.BAR_FORMAT)
        self._bar.total = total
        self._bar.n = min(done, total) if total else done
        label = status["state"] + (f" (retry round {round_number})" if round_number else "")
        if notice:
            text = f"{label}: {notice}"
        else:
            if ended:
                rate = status.get("usage", {}).get("tokens_per_second", 0.0)
            elif status["state"] in (JobState.VALIDATING, JobState.QUEUED):
                rate = 0.0
            else:
                rate = self._live_rate(live)
            text = f"{label}, {rate:.0f} tok/s"
            if not ended and live.get("eta_seconds") is not None:
                text += f", ETA {format_duration(live['eta_seconds'])}"
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_duration(seconds: float) -> str:
    """A duration as H:MM:SS or M:SS."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
