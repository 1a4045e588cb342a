"""Reused scratch tensors, one per dtype per thread."""

from __future__ import annotations

import threading

import torch


class ScratchBuffers(threading.local):
    """One buffer per dtype per thread, reused by every call that needs scratch of it
    (engine.layers.linear's upcast matmuls, int4 tiles, int8 products): a fresh tensor
    per call costs page faults, which take longer than filling it."""

    def __init__(self) -> None:
        self.tensors: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        tensor = self.tensors.get(dtype)
        if tensor is None or tensor.numel() < numel:
            # A normal tensor even when first needed under inference_mode, so that calls
            # outside it may write to it too.
            with torch.inference_mode(False):
                tensor = self.tensors[dtype] = torch.empty(numel, dtype=dtype)
        return tensor[:numel]


scratch = ScratchBuffers()
