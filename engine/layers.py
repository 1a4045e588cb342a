"""Building blocks of the model: normalisation, the SwiGLU activation and linear projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Projection(nn.Linear):
    """A projection made by make_linear: what a quantized load replaces with a QuantLinear."""


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """Create one projection of the model (q/k/v/o, gate/up/down).

    Every projection goes through here and keeps Hugging Face's `weight` / `bias`
    names. The model is built on the "meta" device; for a quantized load
    (`engine.loader.load_weights` with a QuantScheme) the loader swaps each Projection
    for a packed QuantLinear built from its checkpoint tensors (engine/quant/loading.py).
    The output head is not a Projection: it stays in full precision.
    """
    return Projection(in_features, out_features, bias=bias)
