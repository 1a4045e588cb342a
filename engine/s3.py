"""S3 clients, made in one place for every reader and writer of S3: model fetches
(engine/fetch.py) and the jobs layer's object store.

The endpoint comes from AWS_ENDPOINT_URL (MinIO, moto and other S3-compatible servers),
credentials from the usual AWS variables. This module imports neither torch nor the rest
of the engine: the jobs layer's store uses it without loading the engine.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.client import BaseClient

# Standard retry mode: throttling, 5xx, refused, dropped and timed-out connections are
# tried again with jittered exponential backoff (up to 20 s apart), which rides out an
# outage of about a minute; callers retry whole operations beyond that (a worker re-runs
# its shard). Short connect timeouts notice a dead endpoint quickly.
MAX_ATTEMPTS = 10  # botocore's max_attempts: retries after the first try
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 120

_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_DEFAULT_REGION")


def s3_client() -> BaseClient:
    """The S3 client for the endpoint and credentials the environment names now.

    One client per endpoint and credentials, reused: building one loads botocore's service
    model, and a worker opens the store for every task. (boto3 clients are thread-safe.)
    """
    return _client(os.environ.get("AWS_ENDPOINT_URL") or None,
                   *(os.environ.get(name) for name in _CREDENTIAL_VARIABLES))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, *environment: str | None) -> BaseClient:
    """environment: the credential variables' values, only to key the cache (boto3 reads
    them itself)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        # Custom endpoints (MinIO, moto) serve buckets by path, not by virtual host.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
