"""Which failures are worth trying again, and which are running out of memory.

Transient: the object store or the broker could not be reached or answered "try later"
(dropped or refused connections, timeouts, throttling, 5xx). The same work will succeed
once the service is back, so a worker waits and tries again instead of failing the shard.
Everything else (access denied, a missing bucket or object, an unknown model, a bug) is
permanent: trying again would fail the same way, so the shard fails with the reason.

Out of memory: CUDA's torch.OutOfMemoryError, Python's MemoryError, and PyTorch's CPU
allocator failing ("DefaultCPUAllocator: can't allocate memory"), which it raises as a
plain RuntimeError.
"""

from __future__ import annotations

# S3 error codes that mean "the service is there but busy or failing": try again later.
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
})
_CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory")


def is_transient(error: BaseException) -> bool:
    """True for a failure of the store or broker connection that may pass if retried."""
    return any(_is_transient_one(cause) for cause in _chain(error))


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _is_transient_one(error: BaseException) -> bool:
    import botocore.exceptions as boto
    import redis
    import urllib3.exceptions

    if isinstance(error, boto.ClientError):
        info = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return info.get("Code") in _TRANSIENT_S3_CODES or status >= 500
    if isinstance(error, (boto.ConnectionError, boto.HTTPClientError,
                          boto.ResponseStreamingError, boto.IncompleteReadError)):
        return True
    if isinstance(error, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                          urllib3.exceptions.NewConnectionError)):
        return True
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
        return True
    # Socket-level failures that no client library wrapped (a reset mid-read, say).
    return isinstance(error, (ConnectionError, TimeoutError))


def is_service_failure(error: BaseException) -> bool:
    """True when the store or the broker failed (unreachable, refusing, misconfigured),
    as opposed to a bug: a command reports it in one line."""
    import botocore.exceptions as boto
    import redis

    return is_transient(error) or isinstance(error, (boto.BotoCoreError, boto.ClientError,
                                                     redis.RedisError, PermissionError))


def is_out_of_memory(error: BaseException) -> bool:
    """True when an engine step failed for want of (GPU or host) memory."""
    if isinstance(error, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                      if isinstance(t, type))
    if oom_types and isinstance(error, oom_types):
        return True
    return isinstance(error, RuntimeError) and any(
        marker in str(error) for marker in _CPU_OOM_MARKERS)
