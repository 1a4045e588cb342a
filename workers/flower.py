"""`batchinfer flower`: Flower, the Celery web monitor, against the configured broker.

Flower can start and kill tasks and shows every task's arguments, so it never runs without
credentials, except on a loopback address when the operator says so in as many words
(`--insecure-loopback-dev`). The credentials reach Flower through its environment
(FLOWER_BASIC_AUTH), never its command line, where `ps` would show them.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import NoReturn

from jobs.errors import UserError

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5555
# `result` is where a running shard's progress text lands (the `task-progress` event that
# workers/tasks.py sends), so the tasks page shows live progress.
TASKS_COLUMNS = "name,uuid,state,result,received,started,runtime,worker"
# Flower options a user could set in the environment that would open it up.
_UNSAFE_ENV = ("FLOWER_UNAUTHENTICATED_API",)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_basic_auth(credentials: str) -> str:
    """Return credentials if they are `user:password[,user:password...]`, else raise UserError.

    The message never repeats the credentials.
    """
    for pair in credentials.split(","):
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            raise UserError("Flower basic auth must be user:password (several separated by ',')")
    return credentials


def flower_command(address: str, port: int) -> list[str]:
    """The Flower command line (no secrets in it)."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
            f"--address={address}", f"--port={port}", f"--tasks_columns={TASKS_COLUMNS}",
            # State lives in the broker's events; a local database would only go stale.
            "--persistent=False"]


def flower_environment(basic_auth: str | None, address: str, insecure_loopback_dev: bool,
                       environ: dict[str, str]) -> dict[str, str]:
    """Flower's environment: the credentials from basic_auth or FLOWER_BASIC_AUTH.

    UserError when there are none and the operator has not asked for an unauthenticated
    Flower on a loopback address.
    """
    env = {k: v for k, v in environ.items() if k not in _UNSAFE_ENV}
    credentials = basic_auth or env.get("FLOWER_BASIC_AUTH")
    if credentials:
        env["FLOWER_BASIC_AUTH"] = check_basic_auth(credentials)
        return env
    if not insecure_loopback_dev:
        raise UserError("Flower needs credentials: set FLOWER_BASIC_AUTH=user:password "
                        "(or pass --basic-auth user:password)")
    if not is_loopback(address):
        raise UserError(f"--insecure-loopback-dev serves Flower without credentials only on a "
                        f"loopback address, not {address}")
    env.pop("FLOWER_BASIC_AUTH", None)
    return env


def run_flower(address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT,
               basic_auth: str | None = None, insecure_loopback_dev: bool = False) -> NoReturn:
    """Replace this process with Flower (so signals from a supervisor reach it directly)."""
    env = flower_environment(basic_auth, address, insecure_loopback_dev, dict(os.environ))
    argv = flower_command(address, port)
    os.execve(argv[0], argv, env)
