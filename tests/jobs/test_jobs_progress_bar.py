"""The progress bar's tokens/s: measured between polls from the tokens shards report, so
shards shorter than their reporting interval count, from the first poll that finds the job
running; the job's own figure once it ended."""

from __future__ import annotations

from workers.progress_bar import ProgressBar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def running(*shards: tuple[int, int, int, int], eta: float | None = None) -> dict:
    """A running job's status as Job.status() gives it; shards: (index, rows done, rows
    total, tokens)."""
    progress = [{"shard": i, "done": d, "total": t, "tokens": k} for i, d, t, k in shards]
    done = sum(s["done"] for s in progress)
    return {"state": "running",
            "counts": {"total_rows": 30, "succeeded_rows": done, "failed_rows": 0},
            "progress": {"rows_done": done, "tokens_per_second": 0.0, "shards": progress,
                         "eta_seconds": eta}}


def test_rate_counts_tokens_reported_since_the_first_poll(capsys):
    clock = Clock()
    bar = ProgressBar(clock)
    bar.update({"state": "queued", "counts": {"total_rows": 30}, "progress": {"shards": []}})
    clock.now += 30  # the worker loading the model: not part of the rate
    bar.update(running((0, 4, 10, 400)))  # what was done before the bar started: not counted
    assert "running, 0 tok/s" in capsys.readouterr().err
    clock.now += 2
    # shard 0 finished (+600), shard 1 ran whole between two polls (+300), shard 2 started
    bar.update(running((0, 10, 10, 1000), (1, 10, 10, 300), (2, 0, 10, 0)))
    assert "20/30" in (err := capsys.readouterr().err) and "running, 450 tok/s" in err
    clock.now += 3
    # A retry round reran shard 1 from 0: its 120 tokens are new work, not a loss.
    bar.update(running((0, 10, 10, 1000), (1, 3, 10, 120), (2, 5, 10, 480)))
    assert "running, 300 tok/s" in capsys.readouterr().err  # (900 + 120 + 480) / 5
    bar.update({"state": "completed", "counts": {"total_rows": 30, "succeeded_rows": 30},
                "usage": {"tokens_per_second": 812.4}})
    assert "30/30" in (err := capsys.readouterr().err) and "completed, 812 tok/s" in err
    bar.close()


def test_the_bar_is_drawn_once_the_total_is_known_with_an_eta_and_a_notice(capsys):
    bar = ProgressBar(Clock())
    assert capsys.readouterr().err == ""  # no stray empty bar before the first status
    notice = "no worker is consuming queue batchinfer: start one with `batchinfer worker`"
    bar.update({"state": "queued", "counts": {"total_rows": 30}}, notice)
    first = capsys.readouterr().err
    assert "0/30 rows" in first and f"queued: {notice}" in first and "?" not in first
    bar.update(running((0, 10, 10, 100), eta=125.4))
    assert "10/30 rows" in (err := capsys.readouterr().err) and "ETA 2:05" in err
    bar.update({"state": "queued", "counts": {"total_rows": 30}, "retry": {"round": 2},
                "progress": {"rows_done": 1, "rows_total": 4, "shards": []}})
    assert "1/4 rows" in (err := capsys.readouterr().err) and "queued (retry round 2)" in err
    bar.close()
