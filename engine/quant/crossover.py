"""Where a kernel switches paths with the batch size: measured once per shape, then cached.

Some packed-weight kernels have two ways to compute the same product: one that wins for
a few rows (decode) and one that wins for many (prefill, big batches). Which row count
separates them depends on the CPU, the shape and the threads, so it is timed at start-up
on the layer itself, once per distinct shape, instead of being a constant tuned on one
machine. The result is a row count: the large-batch path runs from it on.

Each switch has an environment variable (BATCHINFER_INT8_ACTIVATIONS,
BATCHINFER_INT4_TILES) that tests and operators can set: "on" takes the large-batch path
at every row count, "off" never, "auto" (default) as measured, where the path applies
to this CPU at all.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

# Row counts timed: decode batches to prefill chunks. Between two of them the faster
# path at the smaller one is kept, so the switch happens at one of these.
MEASURED_ROWS = (1, 4, 16, 32, 64, 128, 256)
_REPEATS = 5  # best of a few runs: other processes on a shared CPU only ever add time

_crossovers: dict[Hashable, float] = {}
_SETTINGS = ("auto", "on", "off")

Kernel = Callable[[torch.Tensor], torch.Tensor]


def _fastest_seconds(kernels: tuple[Kernel, Kernel], x: torch.Tensor) -> list[float]:
    """Each kernel's best time on x, run in turns so a busy spell hits both alike."""
    best = [math.inf, math.inf]
    for kernel in kernels:
        kernel(x)  # warm-up: first-touch allocations, lazily built state
    for _ in range(_REPEATS):
        for i, kernel in enumerate(kernels):
            start = time.perf_counter()
            kernel(x)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def crossover_rows(key: Hashable, small: Kernel, large: Kernel, in_features: int,
                   dtype: torch.dtype, device: torch.device) -> float:
    """The fewest rows from which `large` is faster than `small` at every measured row
    count above (math.inf: never). Cached by `key`, which must name the shape, dtype and
    device of the kernels, so layers of one shape share one measurement."""
    if key in _crossovers:
        return _crossovers[key]
    generator = torch.Generator().manual_seed(0)
    large_wins = []
    threads = torch.get_num_threads()
    # Timed on one thread: on a CPU shared with other processes, threads that wait on
    # each other stall for whole time slices whenever one loses its core (8 ms here,
    # against 1 ms products), which would decide by chance. Both paths split their work
    # over threads alike, so one thread ranks them as several do.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for rows in MEASURED_ROWS:
                x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
                small_s, large_s = _fastest_seconds((small, large), x)
                large_wins.append(large_s < small_s)
    finally:
        torch.set_num_threads(threads)
    threshold = math.inf
    for rows, wins in zip(reversed(MEASURED_ROWS), reversed(large_wins), strict=True):
        if not wins:
            break
        threshold = rows
    log.debug("kernel crossover for %s: %s rows", key, threshold)
    _crossovers[key] = threshold
    return threshold


def setting(env_var: str) -> str:
    """"auto", "on" or "off" from `env_var` (unset: auto)."""
    value = os.environ.get(env_var, "auto").strip().lower() or "auto"
    if value not in _SETTINGS:
        raise ValueError(f"{env_var}={value!r}: expected one of {', '.join(_SETTINGS)}")
    return value


def switch_rows(env_var: str, auto: bool, key: Hashable, small: Kernel, large: Kernel,
                in_features: int, dtype: torch.dtype, device: torch.device) -> float:
    """The row count from which a layer runs `large` instead of `small` (math.inf: never):
    `env_var`'s setting, where "auto" measures (`crossover_rows`) if `auto` says the large
    path suits this machine at all, else never takes it."""
    value = setting(env_var)
    if value == "on":
        return 0
    if value == "off" or not auto:
        return math.inf
    return crossover_rows((env_var, key), small, large, in_features, dtype, device)
