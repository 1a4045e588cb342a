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


def is_registered(name: str) -> bool:
    """Whether name is an entry of the BATCHINFER_MODELS registry."""
    entries, _ = _registry()
    return name in entries


def model_for_submit(name: str) -> str:
    """The model as a job stores it: a local folder (one that exists here and is not a
    registered name) as an absolute path, since workers run in other folders; registered
    names and URIs as given, for the workers' registry to resolve."""
    entries, _ = _registry()
    if name in entries or "://" in name:
        return name
    path = Path(name).expanduser()
    return os.path.abspath(path) if path.is_dir() else name


def local_model_folder(name: str) -> Path | None:
    """The folder a model name resolves to on this machine, or None where only a worker can
    tell (a URI, a name this machine's registry lacks, a path that is not here)."""
    try:
        target = resolve_model(name)
    except UserError:
        return None
    return None if "://" in target else Path(target)


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in folder carries a chat template (in tokenizer_config.json or
    in the files that newer transformers versions write beside it)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))
