"""One loaded engine per worker process, reused across shards.

It is loaded on first use inside the process that runs tasks, never in a parent before a
fork (CUDA cannot be re-initialised in a forked child). A shard naming another model
costs a reload, which is why fleets route models to queues.
"""

from __future__ import annotations

import gc
import logging
import os
import threading

from engine import LLM
from engine.fetch import local_model_dir
from engine.quant.gptq import read_quant_config

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: tuple[str, LLM] | None = None


def engine_options() -> dict:
    """Engine settings a worker takes from its environment (defaults: the engine's own)."""
    options: dict = {}
    for env, key, cast in (
        ("BATCHINFER_DTYPE", "dtype", str),
        ("BATCHINFER_DEVICE", "device", str),
        ("BATCHINFER_QUANTIZATION", "quantization", str),
        ("BATCHINFER_KV_CACHE_MEMORY", "kv_cache_memory", str),
        ("BATCHINFER_MAX_NUM_SEQS", "max_num_seqs", int),
        ("BATCHINFER_MAX_NUM_BATCHED_TOKENS", "max_num_batched_tokens", int),
        ("BATCHINFER_ENFORCE_EAGER", "enforce_eager", _flag),
    ):
        if os.environ.get(env):
            options[key] = cast(os.environ[env])
    return options


def options_for(model_path: str) -> dict:
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


def _flag(value: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.strip().lower() not in words:
        raise ValueError(f"expected 1/0, true/false or yes/no, got {value!r}")
    return words[value.strip().lower()]


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

