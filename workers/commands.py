"""What each `batchinfer` command does (workers/cli.py parses the command line)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any, NoReturn

from jobs import expiry, inbox, rollup, settings
from jobs.errors import UserError
from jobs.manifest import TERMINAL_STATES, JobState
from jobs.spec import spec_options
from workers.client import Client, Job
from workers.progress_bar import format_duration

# Exit codes (documented in the README): scripts tell these cases apart.
EXIT_OK = 0  # done; with --wait, the job completed and every row succeeded
EXIT_JOB_NOT_COMPLETED = 1  # with --wait, the job ended failed or cancelled
EXIT_USAGE = 2  # a user mistake: one line on stderr
EXIT_ROWS_FAILED = 3  # with --wait, the job completed but some rows failed
EXIT_UNAVAILABLE = 4  # the broker or the store could not be reached
# How many distinct error reasons a summary shows.
COMMONEST_REASONS = 3

# The commands that use the store (and the broker): they say so, once they have run, when
# those are the embedded defaults, which live in the current folder. (Not before: a user
# mistake stays one line.)
STORE_COMMANDS = ("submit", "status", "jobs", "results", "errors", "cancel", "delete", "retry")
_EMBEDDED = {"BATCHINFER_STORE_URL": "store", "BATCHINFER_BROKER_URL": "broker"}


def say_if_embedded(args: argparse.Namespace) -> None:
    defaults = [name for name in _EMBEDDED if not os.environ.get(name)]
    if defaults and not args.told_store:
        args.told_store = True
        print(f"batchinfer: the embedded {' and '.join(_EMBEDDED[d] for d in defaults)} in "
              f"{settings.home()} (set BATCHINFER_HOME, or {' and '.join(defaults)})",
              file=sys.stderr)


def _client() -> Client:
    return Client()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, sort_keys=True, default=str))


def cmd_submit(args: argparse.Namespace) -> int:
    if args.output and not args.wait:
        raise UserError("--output needs --wait (or use `batchinfer results JOB -o FILE` later)")
    spec = {option.name: getattr(args, option.name) for option in spec_options()
            if getattr(args, option.name) is not None}
    if args.input.lower().endswith(".jsonl"):  # REQUESTS.JSONL too
        job = _client().submit_batch_file(args.input, **spec)
    elif "model" not in spec:
        raise UserError("--model is required (an OpenAI Batch .jsonl file names its own)")
    else:
        job = _client().submit(args.input, **spec)
    if args.json:
        _print_json({"job_id": job.id})
    else:
        print(job.id, flush=True)
    say_if_embedded(args)  # where the job went, before a long wait
    if not args.wait:
        return EXIT_OK
    return _wait_and_summarize(job, progress=not args.json, output=args.output)


def _wait_and_summarize(job: Job, progress: bool, output: str | None = None) -> int:
    """Follow a job to its end, summarize it on stderr; the exit code says how it ended."""
    status = job.wait(progress=progress)
    for line in _summary_lines(status, job):
        print(line, file=sys.stderr)
    if output and status["state"] == JobState.COMPLETED:
        rows = job.download_results(output)
        print(f"wrote {rows} result rows to {output}", file=sys.stderr)
    if status["state"] != JobState.COMPLETED:
        return EXIT_JOB_NOT_COMPLETED
    return EXIT_ROWS_FAILED if status["counts"].get("failed_rows") else EXIT_OK


def _summary_lines(status: dict, job: Job | None = None) -> list[str]:
    """The job in a few lines: state and counts, tokens and speed, progress while it runs,
    the reason it ended, and (given the job) its commonest row errors."""
    counts, usage = status.get("counts", {}), status.get("usage", {})
    line = (f"job {status['job_id']} {status['state']}: {counts.get('succeeded_rows', 0)} rows ok, "
            f"{counts.get('failed_rows', 0)} failed of {counts.get('total_rows', 0)}; "
            f"shards {counts.get('shards_done', 0)}/{counts.get('shards_total', 0)} done")
    lines = [line]
    if usage.get("busy_seconds"):
        lines.append(f"tokens: {usage.get('prompt_tokens', 0)} prompt + "
                     f"{usage.get('completion_tokens', 0)} generated, "
                     f"{usage.get('tokens_per_second', 0):.0f} tok/s (prompt + generated, per "
                     f"busy second), ${usage.get('cost_per_million_tokens', 0):.4f} per 1M tokens")
    live = status.get("progress")
    if live and live.get("eta_seconds") is not None:
        lines.append(f"progress: {live['rows_done']} rows done, ETA "
                     f"{format_duration(live['eta_seconds'])}")
    if status.get("reason"):
        lines.append(f"reason: {status['reason']}")
    if job is not None and counts.get("failed_rows") and status["state"] in TERMINAL_STATES:
        lines.extend(_error_lines(job, counts["failed_rows"]))
    return lines


def _error_lines(job: Job, failed: int) -> list[str]:
    reasons = Counter(job.errors().column("error").to_pylist())
    lines = [f"{failed} row(s) failed; commonest reasons:"]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(COMMONEST_REASONS)]
    if len(reasons) > COMMONEST_REASONS:
        lines.append(f"  ... and {len(reasons) - COMMONEST_REASONS} other reason(s)")
    lines.append(f"  every failed row: batchinfer errors {job.id} -o errors.parquet")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    job = _client().job(args.job)
    if args.wait:
        code = _wait_and_summarize(job, progress=not args.json)
        if args.json:
            _print_json(job.status())
        return code
    status = job.status()
    if args.json:
        _print_json(status)
        return EXIT_OK
    for line in _summary_lines(status, job):
        print(line)
    if status["state"] == JobState.QUEUED:
        notice = job.worker_notice()
        if notice:
            print(notice)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    jobs = [job for job in _client().jobs() if not args.state or job["state"] in args.state]
    jobs = jobs[:args.limit]
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    for job in jobs:
        counts = job.get("counts", {})
        print(f"{job['job_id']}  {job['state']:<10}  {counts.get('total_rows', 0):>8} rows  "
              f"{job.get('created_at', '')[:19]}  {job.get('model', '')}")
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    job = _client().job(args.job)
    if args.format == "jsonl":
        lines = job.download_openai_lines(args.output)
        print(f"wrote {lines} OpenAI output lines to {args.output}", file=sys.stderr)
        return EXIT_OK
    rows = job.download_results(args.output)
    print(f"wrote {rows} result rows to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_errors(args: argparse.Namespace) -> int:
    job = _client().job(args.job)
    if args.format == "jsonl":
        if not args.output:
            raise UserError("--format jsonl needs -o OUT.jsonl")
        lines = job.download_openai_lines(args.output, errors=True)
        print(f"wrote {lines} OpenAI error lines to {args.output}", file=sys.stderr)
        return EXIT_OK
    if args.output:
        rows = job.download_errors(args.output)
        print(f"wrote {rows} failed rows to {args.output}", file=sys.stderr)
        return EXIT_OK
    table = job.errors()
    if args.json:
        _print_json(table.to_pylist())
        return EXIT_OK
    if not table.num_rows:
        print(f"job {job.id} has no failed rows", file=sys.stderr)
    id_column = table.column_names[0]
    for row in table.to_pylist():
        print(f"{row[id_column]}\t{row['error_kind']}\t{row['error']}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    status = _client().job(args.job).cancel(by="batchinfer cancel")
    print(f"job {args.job} {status['state']}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    _client().job(args.job).delete()
    print(f"job {args.job} deleted")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    job = _client().job(args.job)
    plan = job.retry()
    if args.json:
        _print_json(plan)
    elif plan["round"] is None:
        print(f"job {args.job}: nothing to retry")
    else:
        print(f"job {args.job}: retry round {plan['round']} queued: "
              f"{len(plan['whole_shards'])} whole shard(s), {plan['rows']} failed row(s)")
    if not args.wait or plan["round"] is None:
        return EXIT_OK
    return _wait_and_summarize(job, progress=not args.json)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.launcher import parse_gpus, run_workers

    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return run_workers(gpus, args.celery_args)


def cmd_flower(args: argparse.Namespace) -> NoReturn:
    from workers.flower import run_flower

    run_flower(address=args.address, port=args.port, basic_auth=args.basic_auth,
               insecure_loopback_dev=args.insecure_loopback_dev)


def cmd_serve(args: argparse.Namespace) -> int:
    from workers.api.app import run_server

    run_server(host=args.host, port=args.port)
    return EXIT_OK


def cmd_beat(args: argparse.Namespace) -> NoReturn:
    from workers.beat import run_beat

    run_beat(loglevel=args.loglevel)


def cmd_nightly(args: argparse.Namespace) -> int:
    client = _client()
    if args.task == "scan-inbox":
        _print_json(inbox.scan_inbox(client.store, client.submit))
    elif args.task == "rollup-usage":
        day = rollup.parse_day(args.date) if args.date else rollup.yesterday()
        _print_json(rollup.rollup_usage(client.store, day))
    else:
        days = (expiry.retention_days_from_env(os.environ) if args.retention_days is None
                else args.retention_days)
        _print_json({"expired": expiry.expire_jobs(client.store, days)})
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(model=args.model, rows=args.rows)


