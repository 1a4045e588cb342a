"""Build a C kernel source on first use with the machine's C compiler and load it.

The C sources include no Python or torch headers, so one `cc` call builds a shared
library, quick enough for a first use, loaded with ctypes (which releases the GIL while
a kernel runs). Libraries are cached under BATCHINFER_KERNEL_CACHE (default
~/.cache/batchinfer/kernels), keyed by the source, the compiler and the CPU's feature
flags (they are built with -march=native). Where no compiler works, `load` gives None
and the caller keeps its portable PyTorch path: slower, same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from engine.device import cpu_flags
from engine.paths import user_cache_dir

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-pthread"]


def _compile(compiler: str, source: Path) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # its includes
    parts = [source.read_text(), *headers, version, " ".join(FLAGS), " ".join(sorted(cpu_flags()))]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = user_cache_dir("BATCHINFER_KERNEL_CACHE", "kernels") / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a
    # half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as build_dir:
        built = Path(build_dir) / target.name
        subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built), "-lm"],
            capture_output=True, text=True, check=True,
        )
        os.replace(built, target)
    return target


@functools.cache
def load(source: Path, what: str) -> ctypes.CDLL | None:
    """The built library of `source`, or None (logged, naming `what` falls back) where no
    compiler builds it here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.warning("no C compiler found: %s uses the slower portable path", what)
        return None
    try:
        return ctypes.CDLL(str(_compile(compiler, source)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("%s: C kernel unavailable, using the portable path: %s", what, detail)
        return None
