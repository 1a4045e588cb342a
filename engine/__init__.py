"""batchinfer's inference engine: paged KV cache, continuous batching, Llama-family models.

The public names are imported on first use (PEP 562), so that the torch-free modules of
the package (engine.s3) serve layers that must not pull torch in: the jobs store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.engine_config import EngineConfig
    from engine.llm import LLM
    from engine.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.structured.params import StructuredOutputsParams

__all__ = [
    "LLM", "CompletionOutput", "EngineConfig", "FinishReason", "Logprob", "RequestOutput",
    "SamplingParams", "StructuredOutputsParams",
]

_MODULES = {
    "LLM": "engine.llm",
    "EngineConfig": "engine.engine_config",
    "CompletionOutput": "engine.outputs",
    "FinishReason": "engine.outputs",
    "Logprob": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.structured.params",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value  # found directly from now on
    return value
