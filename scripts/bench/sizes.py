"""Sizes the roofline and the KV budgets are counted in, from the engine's ModelConfig."""

from __future__ import annotations

from typing import Any

import torch

from engine import EngineConfig
from engine.config import ModelConfig
from engine.device import parse_memory_size

MIB = 1024 * 1024


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype or of its name ("bfloat16")."""
    return (dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)).itemsize


def layer_params(model: ModelConfig) -> int:
    """Matmul weights of all decoder layers: q, k, v, o and the SwiGLU gate, up, down."""
    heads = 2 * model.num_heads + 2 * model.num_kv_heads
    attn = model.hidden_size * model.head_dim * heads
    return model.num_layers * (attn + 3 * model.hidden_size * model.intermediate_size)


def head_params(model: ModelConfig) -> int:
    return model.hidden_size * model.vocab_size


def matmul_params(model: ModelConfig) -> int:
    """The weights a step multiplies by: every one but the embedding table."""
    return layer_params(model) + head_params(model)


def matmul_weight_bytes(model: ModelConfig, dtype: str | torch.dtype) -> int:
    return matmul_params(model) * dtype_bytes(dtype)


def embed_params(model: ModelConfig) -> int:
    """The embedding table's own weights (none when it is the output head's)."""
    return 0 if model.tie_word_embeddings else model.hidden_size * model.vocab_size


def total_params(model: ModelConfig) -> int:
    norms = (2 * model.num_layers + 1) * model.hidden_size
    return matmul_params(model) + embed_params(model) + norms


def kv_bytes_per_token(model: ModelConfig, dtype: str | torch.dtype) -> int:
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype_bytes(dtype)


def kv_budget(settings: EngineConfig) -> int | None:
    """The KV cache bytes the engine settings give, None where the engine sizes it."""
    if settings.kv_cache_memory == "auto":
        return None
    return parse_memory_size(settings.kv_cache_memory)


def model_summary(model: ModelConfig) -> dict[str, Any]:
    """The JSON's "model" section."""
    return {
        "hidden": model.hidden_size, "layers": model.num_layers, "heads": model.num_heads,
        "kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
        "intermediate": model.intermediate_size, "vocab": model.vocab_size,
        "context": model.max_position_embeddings, "tied": model.tie_word_embeddings,
        "params": total_params(model), "matmul_params": matmul_params(model),
    }
