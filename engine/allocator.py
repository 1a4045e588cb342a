"""Keeping freed memory in the process on CPUs, so a step's tensors reuse the last step's
pages instead of faulting in fresh ones.

glibc's malloc hands every allocation above its mmap threshold (128 KiB at first, grown
to at most 32 MiB as such blocks are freed) to a new mmap and gives it back on free, and
it returns the top of its heap to the system once more than 128 KiB is free there. A CPU
step allocates and frees tensors of megabytes every layer (activations of a 4,096-token
prompt chunk: 6 MiB each), so each one was zero-filled page by page again, about 5% of
a batch run's time. Fixing the threshold at the 32 MiB ceiling and never trimming keeps
those pages: the process stays at its peak heap size, as a long-running engine does
anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h), glibc's ceiling on the mmap threshold on 64-bit, and
# the largest trim threshold mallopt's int takes: in effect, never.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20
NEVER_TRIM = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says (once per process); False where
    the C library is not glibc or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not kept:
        log.debug("mallopt refused; freed memory goes back to the system as before")
    return kept
