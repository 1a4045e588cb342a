"""One loaded engine per worker process, reused across shards and shared by the shards
that run at once (BATCHINFER_WORKER_SHARDS, workers/launcher.py).

It is loaded on first use inside the process that runs tasks, never in a parent before a
fork (CUDA cannot be re-initialised in a forked child). Each task gets its own stream into
it, a SharedClient (engine/shared.py), from `engine_client`. A shard naming another model
costs a reload, which is why fleets route models to queues; the reload waits until no
shard uses the loaded engine, so no shard loses its engine halfway.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

from engine import LLM, EngineConfig
from engine.fetch import local_model_dir
from engine.quant.gptq import read_quant_config
from engine.shared import SharedClient, SharedLLM

log = logging.getLogger(__name__)


@dataclass
class _LoadedEngine:
    model_path: str
    shared: SharedLLM
    users: int = 0  # tasks inside engine_client() with it


# Guards _loaded; notified whenever an engine loses its last user (a switch may go ahead).
_changed = threading.Condition()
_loaded: _LoadedEngine | None = None


# EngineConfig fields a worker does not take from its environment: the model comes with
# each shard; a worker's own seed or max_model_len would make a row's sampled output or its
# "too long" error depend on which worker ran it; block_size and enable_prefix_caching are
# the engine's to tune, not a fleet's.
_NOT_FROM_ENVIRONMENT = frozenset(
    {"model", "seed", "max_model_len", "block_size", "enable_prefix_caching"}
)


def _flag(value: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.strip().lower() not in words:
        raise ValueError(f"expected 1/0, true/false or yes/no, got {value!r}")
    return words[value.strip().lower()]


def _parser(annotation: object) -> Callable[[str], Any]:
    """How a setting's variable is read, by the type of its EngineConfig field."""
    if annotation is bool:
        return _flag
    if annotation is int:
        return int
    if annotation is str or str in get_args(annotation):
        return str  # "auto", names and sizes: the engine parses them
    raise TypeError(f"no parser for an EngineConfig field of type {annotation}")


_FIELD_TYPES = get_type_hints(EngineConfig)
# BATCHINFER_<FIELD> -> (field, parser), e.g. BATCHINFER_MAX_NUM_SEQS -> max_num_seqs, int.
_VARIABLES = {
    f"BATCHINFER_{field.name.upper()}": (field.name, _parser(_FIELD_TYPES[field.name]))
    for field in dataclasses.fields(EngineConfig)
    if field.name not in _NOT_FROM_ENVIRONMENT
}


def engine_options() -> dict[str, Any]:
    """Engine settings a worker takes from its environment (defaults: the engine's own)."""
    return {
        name: parse(os.environ[variable])
        for variable, (name, parse) in _VARIABLES.items()
        if os.environ.get(variable)
    }


def options_for(model_path: str) -> dict[str, Any]:
    """engine_options() for loading model_path.

    A worker's load-time quantization (BATCHINFER_QUANTIZATION=int8, say) is for the float
    checkpoints it is sent; a GPTQ checkpoint is quantized already and loads as it is, so
    one fleet can serve both instead of failing every shard of the GPTQ model.
    """
    options = engine_options()
    requested = options.get("quantization", "").strip().lower()
    if requested and not requested.startswith("gptq") and read_quant_config(model_path):
        log.info("%s is a GPTQ checkpoint: it loads as it is, without the worker's "
                 "load-time quantization %r", model_path, options.pop("quantization"))
    return options


@contextmanager
def engine_client(model_path: str) -> Iterator[SharedClient]:
    """A stream of this task's own into the engine for model_path, which is loaded (and any
    other dropped) if needed: first waiting until no task uses the other one."""
    loaded = _use(model_path)
    try:
        yield loaded.shared.client()
    finally:
        with _changed:
            loaded.users -= 1
            if not loaded.users:
                _changed.notify_all()


def _use(model_path: str) -> _LoadedEngine:
    """The engine for model_path, with this task counted among its users."""
    global _loaded
    with _changed:
        while _loaded is not None and _loaded.model_path != model_path and _loaded.users:
            _changed.wait()
        if _loaded is None or _loaded.model_path != model_path:
            _loaded = None  # the old engine's memory is freed before the new one is loaded
            gc.collect()
            model_dir = str(local_model_dir(model_path))  # s3:// and hub models: fetched once
            llm = LLM(model=model_dir, **options_for(model_dir))
            _loaded = _LoadedEngine(model_path, SharedLLM(llm))
        _loaded.users += 1
        return _loaded
