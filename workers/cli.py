"""The `batchinfer` command line. A user mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from jobs.errors import ServiceUnavailable, UserError
from jobs.faults import is_service_failure
from jobs.manifest import STATES
from jobs.settings import mask_secrets
from jobs.spec import spec_options
from workers.commands import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    STORE_COMMANDS,
    cmd_beat,
    cmd_cancel,
    cmd_delete,
    cmd_demo,
    cmd_errors,
    cmd_flower,
    cmd_jobs,
    cmd_nightly,
    cmd_results,
    cmd_retry,
    cmd_serve,
    cmd_status,
    cmd_submit,
    cmd_worker,
    say_if_embedded,
)

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


_METAVARS = {int: "N", float: "X"}


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The submit flags, shared by `batchinfer submit` and scripts/submit.py: one per job
    spec field (jobs/spec.py), then how to follow the job."""
    parser.add_argument("input", metavar="INPUT.parquet",
                        help="Parquet file of prompts, or an OpenAI Batch input file "
                             "(.jsonl request lines: the model and sampling come from them)")
    text_source = parser.add_mutually_exclusive_group()
    for option in spec_options():
        target = text_source if option.name in ("prompt_column", "messages_column") else parser
        default = "" if option.default is None else f" (default {option.default})"
        # Unset flags stay None, so the spec's own default applies.
        target.add_argument(option.flag, dest=option.name, type=option.parse,
                            help=option.help + default,
                            metavar=_METAVARS.get(option.parse, option.name.split("_")[-1].upper()),
                            **({"action": "append"} if option.name == "stop" else {}))
    parser.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    parser.add_argument("--output", "-o", metavar="OUT.parquet",
                        help="with --wait, download the merged results here")
    parser.add_argument("--json", action="store_true", help='print {"job_id": ...} as JSON')


def _job_command(sub: argparse._SubParsersAction, name: str, **kwargs: str
                 ) -> argparse.ArgumentParser:
    """A command about one job: its JOB argument comes first."""
    parser = sub.add_parser(name, **kwargs)
    parser.add_argument("job", metavar="JOB", help="job id")
    return parser


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

    status = _job_command(sub, "status", help="a job's state, counts and usage")
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

    results = _job_command(sub, "results", help="download a job's merged results")
    results.add_argument("-o", "--output", required=True, metavar="OUT.parquet")
    results.add_argument("--format", choices=("parquet", "jsonl"), default="parquet",
                         help="parquet (default), or jsonl: OpenAI Batch output lines, in "
                              "input order")
    results.set_defaults(func=cmd_results)

    errors = _job_command(
        sub, "errors", help="a job's failed rows: id, kind and reason",
        description="Print the rows of a job that failed (id, error kind, reason; tab-"
                    "separated, or JSON with --json), or write them to a Parquet file with -o. "
                    "Kind 'invalid': the row itself cannot run (fix the input); 'transient': "
                    "the engine failed on it at run time (batchinfer retry runs it again).")
    errors.add_argument("-o", "--output", metavar="ERRORS.parquet",
                        help="write the failed rows here instead of printing them")
    errors.add_argument("--json", action="store_true", help="print a JSON list")
    errors.add_argument("--format", choices=("parquet", "jsonl"), default="parquet",
                        help="with -o: parquet (default), or jsonl: OpenAI Batch error lines")
    errors.set_defaults(func=cmd_errors)

    cancel = _job_command(sub, "cancel", help="cancel a job (rows already written stay)")
    cancel.set_defaults(func=cmd_cancel)

    delete = _job_command(
        sub, "delete", help="delete a finished job from the store",
        description="Delete a finished job's objects (input, results, errors, manifest) from "
                    "the store; its usage records stay. A job still going is refused: cancel "
                    "it first.")
    delete.set_defaults(func=cmd_delete)

    retry = _job_command(
        sub, "retry", help="run again a finished job's failed shards and transiently failed rows",
        description="Run again, in a new retry round, the shards of a finished job that have "
                    "no results (they failed, or the job was cancelled) and the rows whose "
                    "error is of kind 'transient' (the engine failed on them at run time). "
                    "Rows that succeeded and invalid rows are left as they are.")
    retry.add_argument("--wait", action="store_true", help="wait for the round to finish")
    retry.add_argument("--json", action="store_true", help="print what was queued as JSON")
    retry.set_defaults(func=cmd_retry)

    worker = sub.add_parser(
        "worker", help="start GPU workers (one process per GPU) or a CPU worker",
        description="Start one Celery worker per GPU (CUDA_VISIBLE_DEVICES pinned; "
                    "BATCHINFER_WORKER_SHARDS shards at once into one engine: default 2 on a "
                    "GPU, 1 on a CPU), "
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

    serve = sub.add_parser(
        "serve", help="the OpenAI Files and Batches API (for the openai SDK)",
        description="Serve OpenAI's /v1/files and /v1/batches over the configured store and "
                    "broker, so code written for the OpenAI Batch API runs here with another "
                    "base_url and api_key (docs at /docs). Every request needs a Bearer key "
                    "from the file BATCHINFER_API_KEYS names (keys or their SHA-256, one a "
                    "line); it refuses to start without. Batches run models registered in "
                    "BATCHINFER_MODELS.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                           "127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.set_defaults(func=cmd_serve)

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
            say_if_embedded(args)
        return code
    except UserError as exc:
        print(f"batchinfer: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceUnavailable as exc:
        print(f"batchinfer: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as exc:
        if not is_service_failure(exc):
            raise  # a bug: its traceback is worth seeing
        print(f"batchinfer: error: the store or the broker failed: "
              f"{mask_secrets(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def run(argv: list[str] | None = None) -> NoReturn:
    """The `batchinfer` program: main(), then exit without tearing the interpreter down.

    Arrow's thread pool (Parquet reads) can abort a finished process during interpreter
    teardown ("terminate called without an active exception", exit -6: apache/arrow
    #34314); once the output is flushed there is nothing left to tear down for.
    """
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
