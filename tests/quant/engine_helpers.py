"""Building engines and reading their logits in the quantization tests."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import LLM
from scripts.quality import teacher_forced_logits

# Prefix caching off: teacher_forced_logits needs every token computed in one pass.
ENGINE_OPTIONS = dict(device="cpu", kv_cache_memory="64MiB", enable_prefix_caching=False)


def make_llm(model: str | Path, dtype: str = "float32", quantization: str | None = None,
             **options) -> LLM:
    return LLM(model=str(model), dtype=dtype, quantization=quantization,
               **(ENGINE_OPTIONS | options))


def final_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """float32 logits after the whole prompt: what the next token is chosen from."""
    return teacher_forced_logits(llm, token_ids)[-1]


def agreeing_prefix(margins: list[float], threshold: float) -> int:
    """Greedy steps comparable with a reference: those before the first whose recorded
    top-2 margin is below threshold (there, logits within tolerance may pick either)."""
    return next((i for i, m in enumerate(margins) if m < threshold), len(margins))
