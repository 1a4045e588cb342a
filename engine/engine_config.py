"""The engine's settings, validated in one place: what `LLM(...)` takes, as a dataclass.

`LLM(**kwargs)` builds an EngineConfig from its keyword arguments (vLLM's names and
defaults), and `LLM.engine_config` holds the same settings resolved for the loaded model
and this machine. The field names are LLM's keyword names, so `LLM(**vars(config))` builds
the engine a config describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.device import parse_memory_size


@dataclass(frozen=True)
class EngineConfig:
    """One engine's settings. As given, dtype, device and kv_cache_memory may be "auto",
    quantization and max_model_len None; resolved (`LLM.engine_config`), device and dtype
    are torch objects, quantization is the scheme's canonical name (None: float weights,
    see engine/quant/scheme.py), max_model_len the context length and kv_cache_memory
    the bytes of the KV pool."""

    model: str  # a local folder, an s3:// URI or a hub name (engine/fetch.py)
    dtype: str | torch.dtype = "auto"  # "auto": bfloat16 where it is fast, else float32
    device: str | torch.device = "auto"  # "auto": CUDA where there is a GPU
    quantization: str | None = None  # None: as the checkpoint is; "int8", "int4-g64": at load
    block_size: int = 16  # tokens per KV cache block
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 4096  # tokens computed per step
    kv_cache_memory: int | str = "auto"  # bytes, or "4GiB"; "auto": sized from free memory
    enable_prefix_caching: bool = True
    seed: int = 0  # the sampler's generator for requests that bring no seed of their own
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # Never replay decode steps from CUDA graphs (engine/cuda_graphs.py), which are
    # otherwise captured at start-up on CUDA.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        """ValueError for settings that no model or machine could make valid; the rest
        (a context longer than the model's, a pool too small for one block) is checked
        where the model is loaded."""
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            _check_positive_int("max_model_len", self.max_model_len)
        if self.kv_cache_memory != "auto":
            parse_memory_size(self.kv_cache_memory)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
