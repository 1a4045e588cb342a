"""One loaded engine per worker process, reused across shards.

It is loaded on first use inside the process that runs tasks, never in a parent before a
fork (CUDA cannot be re-initialised in a forked child). A shard naming another model
costs a reload, which is why fleets route models to queues.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, get_args, get_type_hints

from engine import LLM, EngineConfig
from engine.fetch import local_model_dir
from engine.quant.gptq import read_quant_config

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: tuple[str, LLM] | None = None


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


def get_engine(model_path: str) -> LLM:
    """The engine for model_path, loading it (and dropping any other) if needed."""
    global _loaded
    with _lock:
        if _loaded is not None and _loaded[0] == model_path:
            return _loaded[1]
        _loaded = None
        gc.collect()
        model_dir = str(local_model_dir(model_path))  # s3:// and hub models: fetched once
        llm = LLM(model=model_dir, **options_for(model_dir))
        _loaded = (model_path, llm)
        return llm

