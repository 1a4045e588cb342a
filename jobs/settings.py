"""Configuration from the environment (12-factor), with embedded defaults that need no server.

Every setting is read when asked for, not at import, so a process can change its
environment (the demo, tests) before using it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from jobs.errors import UserError

EMBEDDED_HOME = Path(".batchinfer")


def home() -> Path:
    """Where the embedded broker and store live: `.batchinfer/` in the working directory."""
    return Path(os.environ.get("BATCHINFER_HOME") or EMBEDDED_HOME).resolve()


def store_url() -> str:
    """The object store: `s3://bucket/prefix` or `file:///path` (default: `file://./.batchinfer`)."""
    url = os.environ.get("BATCHINFER_STORE_URL") or f"file://{home()}"
    return absolute_store_url(url)


def absolute_store_url(url: str) -> str:
    """Workers run in other directories: a relative `file://./x` must travel as an absolute path."""
    if url.startswith("file://"):
        return f"file://{Path(url.removeprefix('file://')).resolve()}"
    return url


def broker_url() -> str:
    """The Celery broker (default: the embedded filesystem broker under `.batchinfer/broker`)."""
    return os.environ.get("BATCHINFER_BROKER_URL") or "filesystem://"


def env_number(variable: str, default: float, environ: Mapping[str, str] = os.environ,
               positive: bool = False) -> float:
    """A numeric setting: unset or empty gives default; anything else must parse (and be
    positive where asked), or it is a one-line configuration error."""
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{variable} must be a number, got {raw!r}") from None
    if positive and value <= 0:
        raise UserError(f"{variable} must be a positive number, got {raw!r}")
    return value


def env_whole_number(variable: str, default: int, environ: Mapping[str, str] = os.environ,
                     minimum: int | None = None) -> int:
    """A whole-number setting (1_000 reads as 1000): unset or empty gives default; anything
    else must parse (and be at least minimum, where given), or it is a one-line
    configuration error."""
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise UserError(f"{variable} must be a whole number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{variable} must be at least {minimum}, got {value}")
    return value


def gpu_hourly_usd() -> float:
    """The worker's hourly price, for cost records (default 0)."""
    return env_number("BATCHINFER_GPU_HOURLY_USD", 0.0)


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@", re.I)


def mask_secrets(text: str) -> str:
    """Hide passwords inside URLs (redis://:secret@host) before anything is printed or stored."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
