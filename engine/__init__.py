"""batchinfer's inference engine: paged KV cache, continuous batching, Llama-family models."""

from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
