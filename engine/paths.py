"""Where the engine keeps files between runs (compiled kernels, fetched models)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(variable: str, name: str) -> Path:
    """$variable if set, else $XDG_CACHE_HOME/batchinfer/name (~/.cache/batchinfer/name)."""
    configured = os.environ.get(variable)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchinfer" / name
