"""Resolve the model a job names to what the engine loads (a local folder or a URI).

BATCHINFER_MODELS may point to a JSON registry {"name": "path or URI"}; registered names
resolve through it. A URI (s3://bucket/prefix, hf://org/name) is fetched by the engine
(engine/fetch.py) on the worker. Anything else must be a local model folder. When
BATCHINFER_MODEL_ROOTS (folders separated by ":") is set, every local model path, named
directly or through the registry, must lie under one of them once symlinks are resolved,
so a job cannot make a worker read arbitrary folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jobs.errors import UserError

REMOTE_SCHEMES = ("s3://", "hf://")  # what engine.fetch downloads


def _registry() -> tuple[dict[str, str], Path | None]:
    """The registry's entries and its folder (relative paths in it are relative to that)."""
    location = os.environ.get("BATCHINFER_MODELS")
    if not location:
        return {}, None
    path = Path(location).expanduser()
    try:
        entries = json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"BATCHINFER_MODELS: cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"BATCHINFER_MODELS: {path} is not valid JSON ({error})") from None
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise UserError(f"BATCHINFER_MODELS: {path} must be a JSON object of name -> path/URI")
    return entries, path.resolve().parent


def _allowed_roots() -> list[Path] | None:
    raw = os.environ.get("BATCHINFER_MODEL_ROOTS")
    if not raw:
        return None
    return [Path(p).expanduser().resolve() for p in raw.split(":") if p]


def _local_model(path: Path, shown_as: str, registered: list[str]) -> str:
    resolved = path.expanduser().resolve()
    roots = _allowed_roots()
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise UserError(f"model {shown_as!r} is outside the allowed model folders "
                        f"(BATCHINFER_MODEL_ROOTS)")
    if not (resolved / "config.json").is_file():
        known = f" (registered: {', '.join(registered)})" if registered else ""
        raise UserError(f"unknown model {shown_as!r}: not a registered name{known} and not "
                        f"a local model folder (one with a config.json)")
    return str(resolved)


def resolve_model(name: str) -> str:
    """The path or URI to load for model name; UserError if it is unknown or not allowed."""
    if not name:
        raise UserError("no model given")
    entries, registry_folder = _registry()
    registered = sorted(entries)
    if name in entries:
        target = entries[name]
        if "://" in target:  # fetched by the engine on the worker: only the scheme is checked
            if not target.startswith(REMOTE_SCHEMES):
                raise UserError(f"model {name!r} is registered as {target!r}: BATCHINFER_MODELS "
                                f"takes local paths and {' or '.join(REMOTE_SCHEMES)} URIs")
            return target
        return _local_model(registry_folder / target, name, registered)
    if "://" in name:
        raise UserError(f"unknown model {name!r}: a URI must be registered in BATCHINFER_MODELS")
    return _local_model(Path(name), name, registered)
