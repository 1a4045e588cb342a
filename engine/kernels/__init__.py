"""Paged decode attention kernels: one query token per sequence against its KV blocks,
read in place from the pool (no gather), with an online softmax in float32.

- CPU: a small C kernel (paged_decode.c, built on first use by cpu.py).
- CUDA: a Triton kernel (triton_decode.py), where Triton is installed (CUDA builds of
  torch bring it).

Both take the same inputs, which have fixed shapes for a given batch size (block tables
padded to a width, context lengths), so a CUDA graph can replay a decode step. Where
neither kernel applies, attention uses its portable PyTorch path (engine/attention.py).
"""

from __future__ import annotations

import importlib.util

import torch

from engine.kernels import cpu

# Per-program tiles of the Triton kernel: [group, head_dim] queries and accumulators.
_TRITON_MAX_HEAD_DIM = 256
_TRITON_MAX_GROUP = 16


def paged_decode_supported(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> bool:
    """Whether `paged_decode` can run this shape on this device (else use the portable path)."""
    if device.type == "cpu":
        return cpu.supported(dtype, num_heads, num_kv_heads, head_dim, block_size)
    return (
        device.type == "cuda"
        and importlib.util.find_spec("triton") is not None
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and head_dim <= _TRITON_MAX_HEAD_DIM
        and num_heads // num_kv_heads <= _TRITON_MAX_GROUP
    )


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q: [B, heads, head_dim]; pools: [num_blocks, kv_heads, block_size, head_dim];
    block_tables: [B, width] int64; context_lens: [B] int64 (the query is the last
    position; 0 marks a padding row, whose output is zeros). Returns [B, heads, head_dim]
    in q's dtype. Only call where `paged_decode_supported` says so.
    """
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("KV pools must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    if q.device.type == "cpu":
        backend = cpu.paged_decode
    else:
        from engine.kernels import triton_decode  # imports Triton: only on CUDA

        backend = triton_decode.paged_decode
    backend(
        q, k_pool, v_pool, block_tables.contiguous(), context_lens.contiguous(), out, scale,
        window or 0,
    )
    return out
