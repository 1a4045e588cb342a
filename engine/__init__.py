"""batchinfer's inference engine: paged KV cache, continuous batching, Llama-family models.

The public names are imported on first use (PEP 562), so that the torch-free modules of
the package (engine.s3) serve layers that must not pull torch in: the jobs store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _MODULES)
