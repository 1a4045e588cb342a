"""Building blocks of the model: normalisation, the SwiGLU activation and linear projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.device import cpu_matmul_upcasts
from engine.kernels import row_passes
from engine.scratch import scratch


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of x; with `add`, of x += add (x updated in place: the residual
        stream), in one pass where the CPU kernel applies (engine/kernels/row_passes.py)."""
        return row_passes.rms_norm(x, self.weight, self.eps, add)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return row_passes.silu_and_mul(gate, up)


# Float32 weight elements converted at a time by `linear` (8 MiB): the chunk stays in the
# last-level cache between its conversion and its matmul.
UPCAST_CHUNK_ELEMENTS = 1 << 21


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed in float32 for CPU weights whose dtype torch only emulates there.

    Weights stay stored in their dtype and are converted a chunk of output features at a
    time into a reused buffer; the result is rounded back to x's dtype, as a native GEMM
    with float32 accumulation would return it. A single row stays in the weight's dtype:
    there torch's GEMV beats converting the weight.
    """
    single_row = x.numel() <= x.shape[-1]
    if weight.device.type != "cpu" or single_row or not cpu_matmul_upcasts(weight.dtype):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    rows = max(1, UPCAST_CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        chunk = scratch.get((stop - start) * in_features, torch.float32)
        chunk = chunk.view(stop - start, in_features)
        chunk.copy_(weight[start:stop])
        chunk_bias = None if bias is None else bias[start:stop].float()
        out[..., start:stop] = F.linear(x32, chunk, chunk_bias)
    return out


class Projection(nn.Linear):
    """A projection made by make_linear: what a quantized load replaces with a QuantLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """Create one projection of the model (q/k/v/o, gate/up/down).

    Every projection goes through here and keeps Hugging Face's `weight` / `bias`
    names. The model is built on the "meta" device; for a quantized load
    (`engine.loader.load_weights` with a QuantScheme) the loader swaps each Projection
    for a packed QuantLinear built from its checkpoint tensors (engine/quant/loading.py).
    The output head is not a Projection: it stays in full precision.
    """
    return Projection(in_features, out_features, bias=bias)
