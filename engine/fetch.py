"""Where a model's files come from: `LLM(model=...)` takes a folder, an s3:// URI or a hub name.

    /models/qwen-7b            a local Hugging Face folder, used where it is
    s3://bucket/models/qwen    the model files at the top of the prefix (config, tokenizer,
                               safetensors weights; not `original/` or other folders that
                               published repositories carry), downloaded once into
                               BATCHINFER_MODEL_CACHE (default ~/.cache/batchinfer/models)
                               and downloaded again only when the listing changes (keys,
                               sizes, ETags); endpoint and credentials from the usual AWS
                               variables (AWS_ENDPOINT_URL for MinIO and the like)
    Qwen/Qwen2.5-7B, hf://...  a Hugging Face hub repository, through huggingface_hub's own
                               cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN apply)

Processes on one machine (a worker per GPU) that fetch the same URI at once download it
once: the second waits on a lock and finds the copy current.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from engine.paths import user_cache_dir
from engine.s3 import s3_client

# The files a model folder needs: config, weights, tokenizer. Never code.
_MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SOURCE_FILE = ".batchinfer-source.json"  # the listing a cached copy was downloaded from

log = logging.getLogger(__name__)


def local_model_dir(model: str) -> Path:
    """The local folder holding model's files, fetching them first where model is remote.

    FileNotFoundError when there is nothing at that name; ValueError for a URI scheme
    that is not supported."""
    if model.startswith("s3://"):
        return _from_s3(model)
    if model.startswith("hf://"):
        return _from_hub(model.removeprefix("hf://"), model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if "://" in model:
        raise ValueError(f"unsupported model URI {model!r}: use a local folder, "
                         "s3://bucket/prefix or a hub name (org/name)")
    if _HUB_REPO.fullmatch(model):
        return _from_hub(model, model)
    raise FileNotFoundError(f"model path {model!r} is not a local model folder")


def _from_hub(repo_id: str, shown_as: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_MODEL_FILES)))
    except Exception as error:  # offline, unknown repository, gated, no network...
        first_line = (str(error).splitlines() or [""])[0]  # the hub's errors run long
        raise FileNotFoundError(
            f"model {shown_as!r} is not a local folder, and fetching it from the Hugging Face "
            f"hub failed: {type(error).__name__}: {first_line}"
        ) from None


def _from_s3(uri: str) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise ValueError(f"model URI {uri!r}: expected s3://bucket/prefix")
    client = s3_client()
    listing = _list_objects(client, bucket, prefix + "/")
    if not listing:
        raise FileNotFoundError(f"no model files (config, tokenizer, safetensors) under {uri}")
    if "config.json" not in listing:
        raise FileNotFoundError(f"{uri} holds no config.json: not a Hugging Face model folder")
    root = user_cache_dir("BATCHINFER_MODEL_CACHE", "models")
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + PurePosixPath(prefix).name
    target = root / name
    with _locked(root / f"{name}.lock"):
        if _read_source(target) == {"uri": uri, "objects": listing}:
            return target
        size = sum(entry[0] for entry in listing.values())
        log.info("fetching %s (%d files, %.2f GB) into %s", uri, len(listing), size / 1e9, target)
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            for file_name in listing:
                client.download_file(bucket, f"{prefix}/{file_name}", str(staging / file_name))
            (staging / _SOURCE_FILE).write_text(json.dumps({"uri": uri, "objects": listing}))
            if target.exists():  # an older copy: the objects changed since
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %s in %.1f s", uri, time.monotonic() - started)
    return target


def _list_objects(client, bucket: str, prefix: str) -> dict[str, list]:
    """{file name: [size, ETag]} of the model files directly below prefix."""
    listing = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix):]
            if "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in _MODEL_FILES):
                listing[name] = [item["Size"], item["ETag"]]
    return listing


def _read_source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
