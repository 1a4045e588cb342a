"""The `batchinfer` command line. A user mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from jobs import settings
from jobs.errors import ServiceUnavailable, UserError
from jobs.manifest import STATES
from jobs.settings import mask_secrets

# Exit codes (documented in the README): scripts tell these cases apart.
EXIT_OK = 0  # done; with --wait, the job completed and every row succeeded
EXIT_JOB_NOT_COMPLETED = 1  # with --wait, the job ended failed or cancelled
EXIT_USAGE = 2  # a user mistake: one line on stderr
EXIT_ROWS_FAILED = 3  # with --wait, the job completed but some rows failed
EXIT_UNAVAILABLE = 4  # the broker or the store could not be reached
# How many distinct error reasons a summary shows.
COMMONEST_REASONS = 3

SUBMIT_HELP = """Validate INPUT.parquet, upload it to the store and queue its shards.
Prints the job id (or {"job_id": ...} with --json). With --wait, shows a progress bar,
then a summary with the commonest reasons rows failed; exits 0 when every row succeeded,
3 when the job completed with failed rows, 1 when it failed or was cancelled."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UserError(f"{message} (see {self.prog} --help)")


def _package_version() -> str:
    try:
        return version("batchinfer")
    except PackageNotFoundError:
        return "unknown"


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The submit flags, shared by `batchinfer submit` and scripts/submit.py."""
    parser.add_argument("input", metavar="INPUT.parquet", help="Parquet file of prompts")
    parser.add_argument("--model", required=True,
                        help="model name from BATCHINFER_MODELS, or a local Hugging Face folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt-column", default="prompt", help="text column (default: prompt)")
    source.add_argument("--messages-column",
                        help="column of chat messages (list of {role, content}), rendered with "
                             "the model's chat template")
    parser.add_argument("--id-column", help="unique row id column (default: the row index)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate per row (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    parser.add_argument("--top-k", type=int, default=-1, help="top-k sampling (default off)")
    parser.add_argument("--seed", type=int, help="sampling seed, per row (reproducible outputs)")
    parser.add_argument("--stop", action="append", metavar="S", help="stop string (repeatable)")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default 1000)")
    parser.add_argument("--queue", help="Celery queue for this job's shards (route by model)")
    parser.add_argument("--idempotency-key", help="a key already used returns the existing job")
    parser.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    parser.add_argument("--output", "-o", metavar="OUT.parquet",
                        help="with --wait, download the merged results here")
    parser.add_argument("--json", action="store_true", help='print {"job_id": ...} as JSON')


def _client():
    from jobs.client import Client

    return Client()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, sort_keys=True, default=str))


def cmd_submit(args: argparse.Namespace) -> int:
    if args.output and not args.wait:
        raise UserError("--output needs --wait (or use `batchinfer results JOB -o FILE` later)")
    spec = {name: getattr(args, name) for name in (
        "prompt_column", "messages_column", "id_column", "max_tokens", "temperature", "top_p",
        "top_k", "seed", "stop", "shard_size", "queue", "idempotency_key")}
    job = _client().submit(args.input, model=args.model, **spec)
    if args.json:
        _print_json({"job_id": job.id})
    else:
        print(job.id, flush=True)
    _say_if_embedded(args)  # where the job went, before a long wait
    if not args.wait:
        return EXIT_OK
    return _wait_and_summarize(job, progress=not args.json, output=args.output)


def _wait_and_summarize(job, progress: bool, output: str | None = None) -> int:
    """Follow a job to its end, summarize it on stderr; the exit code says how it ended."""
    status = job.wait(progress=progress)
    for line in _summary_lines(status, job):
        print(line, file=sys.stderr)
    if output and status["state"] == "completed":
        rows = job.download_results(output)
        print(f"wrote {rows} result rows to {output}", file=sys.stderr)
    if status["state"] != "completed":
        return EXIT_JOB_NOT_COMPLETED
    return EXIT_ROWS_FAILED if status["counts"].get("failed_rows") else EXIT_OK


def _summary_lines(status: dict, job=None) -> list[str]:
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
        from jobs.client import format_duration

        lines.append(f"progress: {live['rows_done']} rows done, ETA "
                     f"{format_duration(live['eta_seconds'])}")
    if status.get("reason"):
        lines.append(f"reason: {status['reason']}")
    if job is not None and counts.get("failed_rows") and status["state"] in (
            "completed", "failed", "cancelled"):
        lines.extend(_error_lines(job, counts["failed_rows"]))
    return lines


def _error_lines(job, failed: int) -> list[str]:
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
    if status["state"] == "queued":
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
    rows = _client().job(args.job).download_results(args.output)
    print(f"wrote {rows} result rows to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_errors(args: argparse.Namespace) -> int:
    job = _client().job(args.job)
    if args.output:
        rows = job.download_errors(args.output)
        print(f"wrote {rows} failed rows to {args.output}", file=sys.stderr)
        return EXIT_OK
    table = job.errors()
    if args.json:
        _print_json(table.to_pylist())
        return EXIT_OK
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


def cmd_beat(args: argparse.Namespace) -> NoReturn:
    from workers.beat import run_beat

    run_beat(loglevel=args.loglevel)


def cmd_nightly(args: argparse.Namespace) -> int:
    from jobs import nightly

    client = _client()
    if args.task == "scan-inbox":
        _print_json(nightly.scan_inbox(client.store, client.submit))
    elif args.task == "rollup-usage":
        day = nightly.parse_day(args.date) if args.date else nightly.yesterday()
        _print_json(nightly.rollup_usage(client.store, day))
    else:
        days = (nightly.retention_days_from_env(os.environ) if args.retention_days is None
                else args.retention_days)
        _print_json({"expired": nightly.expire_jobs(client.store, days)})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(model=args.model, rows=args.rows)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchinfer", description=(
        "Batch LLM inference on your own GPUs: submit a Parquet file of prompts, workers run "
        "every row through a quantized, paged-KV, continuously batched engine, results and "
        "usage land in object storage. Configured from the environment: "
        "BATCHINFER_STORE_URL, BATCHINFER_BROKER_URL, ... (see the README)."))
    parser.add_argument("--version", action="version", version=f"batchinfer {_package_version()}")
    parser.set_defaults(told_store=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    submit = sub.add_parser("submit", help="submit a Parquet file of prompts", description=SUBMIT_HELP)
    add_submit_arguments(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="a job's state, counts and usage")
    status.add_argument("job", metavar="JOB", help="job id")
    status.add_argument("--json", action="store_true", help="print the manifest as JSON")
    status.add_argument("--wait", action="store_true",
                        help="follow the job to its end with a progress bar (exit codes as "
                             "submit --wait)")
    status.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", action="append", choices=STATES, metavar="STATE",
                      help=f"only jobs in this state (repeatable; one of {', '.join(STATES)})")
    jobs.add_argument("--limit", type=int, metavar="N", help="at most N jobs")
    jobs.add_argument("--json", action="store_true", help="print a JSON list")
    jobs.set_defaults(func=cmd_jobs)

    results = sub.add_parser("results", help="download a job's merged results")
    results.add_argument("job", metavar="JOB", help="job id")
    results.add_argument("-o", "--output", required=True, metavar="OUT.parquet")
    results.set_defaults(func=cmd_results)

    errors = sub.add_parser(
        "errors", help="a job's failed rows: id, kind and reason",
        description="Print the rows of a job that failed (id, error kind, reason; tab-"
                    "separated, or JSON with --json), or write them to a Parquet file with -o. "
                    "Kind 'invalid': the row itself cannot run (fix the input); 'transient': "
                    "the engine failed on it at run time (batchinfer retry runs it again).")
    errors.add_argument("job", metavar="JOB", help="job id")
    errors.add_argument("-o", "--output", metavar="ERRORS.parquet",
                        help="write the failed rows here instead of printing them")
    errors.add_argument("--json", action="store_true", help="print a JSON list")
    errors.set_defaults(func=cmd_errors)

    cancel = sub.add_parser("cancel", help="cancel a job (rows already written stay)")
    cancel.add_argument("job", metavar="JOB", help="job id")
    cancel.set_defaults(func=cmd_cancel)

    delete = sub.add_parser(
        "delete", help="delete a finished job from the store",
        description="Delete a finished job's objects (input, results, errors, manifest) from "
                    "the store; its usage records stay. A job still going is refused: cancel "
                    "it first.")
    delete.add_argument("job", metavar="JOB", help="job id")
    delete.set_defaults(func=cmd_delete)

    retry = sub.add_parser(
        "retry", help="run again a finished job's failed shards and transiently failed rows",
        description="Run again, in a new retry round, the shards of a finished job that have "
                    "no results (they failed, or the job was cancelled) and the rows whose "
                    "error is of kind 'transient' (the engine failed on them at run time). "
                    "Rows that succeeded and invalid rows are left as they are.")
    retry.add_argument("job", metavar="JOB", help="job id")
    retry.add_argument("--wait", action="store_true", help="wait for the round to finish")
    retry.add_argument("--json", action="store_true", help="print what was queued as JSON")
    retry.set_defaults(func=cmd_retry)

    worker = sub.add_parser(
        "worker", help="start GPU workers (one process per GPU) or a CPU worker",
        description="Start one Celery worker per GPU (CUDA_VISIBLE_DEVICES pinned, solo pool), "
                    "or one CPU worker where there is no GPU. Arguments after the known ones go "
                    "to `celery worker` (e.g. --queues, --hostname, --loglevel).")
    worker.add_argument("--gpus", help="'all' (default), 'none', or indexes like 0,1")
    worker.set_defaults(func=cmd_worker, celery_args=[])

    flower = sub.add_parser(
        "flower", help="the Flower web monitor (workers, shard tasks, live progress)",
        description="Run Flower against the configured broker. Credentials are required: "
                    "FLOWER_BASIC_AUTH=user:password in the environment (preferred: a command "
                    "line is visible to other users of the machine) or --basic-auth.")
    flower.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    flower.add_argument("--port", type=int, default=5555, help="port (default 5555)")
    flower.add_argument("--basic-auth", metavar="USER:PASS",
                        help="credentials (default: FLOWER_BASIC_AUTH)")
    flower.add_argument("--insecure-loopback-dev", action="store_true",
                        help="allow running without credentials, on a loopback address only")
    flower.set_defaults(func=cmd_flower)

    beat = sub.add_parser(
        "beat", help="schedule the nightly tasks (Celery beat)",
        description="Send the nightly tasks (inbox scan, usage rollup, job expiry) to the "
                    "nightly queue on the schedule in BATCHINFER_SCAN_INBOX_CRON, "
                    "BATCHINFER_ROLLUP_CRON and BATCHINFER_EXPIRE_CRON. Run exactly one.")
    beat.add_argument("--loglevel", default="INFO", help="log level (default INFO)")
    beat.set_defaults(func=cmd_beat)

    nightly = sub.add_parser("nightly", help="run one nightly task now, here (prints JSON)")
    tasks = nightly.add_subparsers(dest="task", metavar="TASK", required=True,
                                   parser_class=_Parser)
    tasks.add_parser("scan-inbox", help="submit new inbox/NAME.parquet files as jobs and "
                                        "deliver finished ones to outbox/NAME/")
    rollup = tasks.add_parser("rollup-usage", help="sum a day's usage records per model into "
                                                   "usage/daily/date=D/summary.parquet")
    rollup.add_argument("--date", metavar="YYYY-MM-DD", help="the UTC day (default yesterday)")
    expire = tasks.add_parser("expire-jobs", help="delete finished jobs past the retention")
    expire.add_argument("--retention-days", type=int,
                        help="default BATCHINFER_RETENTION_DAYS, else 30")
    nightly.set_defaults(func=cmd_nightly)

    demo = sub.add_parser("demo", help="run a whole job on embedded defaults (no servers)")
    demo.add_argument("--model", help="a local Hugging Face folder (default: stories260K "
                                      "where present, else a random-weight model built here)")
    demo.add_argument("--rows", type=int, default=300, help="prompts in the sample file")
    demo.set_defaults(func=cmd_demo)
    return parser


# The commands that use the store (and the broker): they say so, once they have run, when
# those are the embedded defaults, which live in the current folder. (Not before: a user
# mistake stays one line.)
STORE_COMMANDS = ("submit", "status", "jobs", "results", "errors", "cancel", "delete", "retry")
_EMBEDDED = {"BATCHINFER_STORE_URL": "store", "BATCHINFER_BROKER_URL": "broker"}


def _say_if_embedded(args: argparse.Namespace) -> None:
    defaults = [name for name in _EMBEDDED if not os.environ.get(name)]
    if defaults and not args.told_store:
        args.told_store = True
        print(f"batchinfer: the embedded {' and '.join(_EMBEDDED[d] for d in defaults)} in "
              f"{settings.home()} (set BATCHINFER_HOME, or {' and '.join(defaults)})",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "worker":
            raise UserError(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "worker":
            args.celery_args = extra
        code = args.func(args)
        if args.command in STORE_COMMANDS:
            _say_if_embedded(args)
        return code
    except UserError as exc:
        print(f"batchinfer: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceUnavailable as exc:
        print(f"batchinfer: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
