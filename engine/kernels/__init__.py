"""Paged decode attention kernels: one query token per sequence against its KV blocks,
read in place from the pool (no gather), with an online softmax in float32.

- CPU: a small C kernel (paged_decode.c, built on first use by cpu.py).
- CUDA: a Triton kernel (triton_decode.py), where Triton is installed (CUDA builds of
  torch bring it).

Both take the same inputs, which have fixed shapes for a given batch size (block tables
padded to a width, context lengths), so a CUDA graph can replay a decode step. Where
neither kernel applies, attention uses its portable PyTorch path (engine/attention.py).

A kernel is used only after it ran once at the model's shapes and agreed with a plain
float64 computation (`self_check`): a Triton or C compiler that builds it wrongly, or
fails to build it, on a machine it was never tried on costs speed, not every decode step.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from engine.kernels import cpu

log = logging.getLogger(__name__)

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
    """Whether `paged_decode` runs this shape on this device and passed its self-check
    (else use the portable path)."""
    if device.type == "cpu":
        applies = cpu.supported(dtype, num_heads, num_kv_heads, head_dim, block_size)
    else:
        applies = (
            device.type == "cuda"
            and importlib.util.find_spec("triton") is not None
            and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and head_dim <= _TRITON_MAX_HEAD_DIM
            and num_heads // num_kv_heads <= _TRITON_MAX_GROUP
        )
    return applies and self_check(device, dtype, num_heads, num_kv_heads, head_dim, block_size)


# Agreement with the float64 computation: the tests' tolerances, by pool dtype.
_SELF_CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@functools.cache
def self_check(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> bool:
    """Run `paged_decode` once on random inputs of these shapes (a padding row, one token,
    a whole block, several blocks in a shuffled table; with and without a sliding window)
    and compare it with a float64 computation; False, with a warning, if it fails or
    disagrees."""
    generator = torch.Generator().manual_seed(0)
    lens = [0, 1, block_size, 3 * block_size + 2]
    width = -(-max(lens) // block_size)
    tables = torch.randperm(len(lens) * width, generator=generator).view(len(lens), width)
    pool_shape = (len(lens) * width, num_kv_heads, block_size, head_dim)
    k_pool, v_pool = (torch.randn(pool_shape, generator=generator) for _ in range(2))
    q = torch.randn(len(lens), num_heads, head_dim, generator=generator)
    context_lens = torch.tensor(lens)
    scale = head_dim**-0.5
    shape = f"{dtype} heads {num_heads}/{num_kv_heads} head_dim {head_dim} block {block_size}"
    for window in (None, block_size + 1):
        try:
            out = paged_decode(
                *(t.to(device, dtype) for t in (q, k_pool, v_pool)),
                tables.to(device), context_lens.to(device), scale, window,
            ).cpu()
        except Exception as error:  # a kernel that does not build or launch here
            log.warning("the %s decode kernel failed its self-check (%s): %s; attention uses "
                        "the portable path", device.type, shape, error)
            return False
        # The same rounded inputs the kernel read, in float64.
        expected = _plain_decode(
            *(t.to(dtype).double() for t in (q, k_pool, v_pool)), tables, lens, scale, window
        )
        tolerance = _SELF_CHECK_TOLERANCE[dtype]
        if not torch.allclose(out.double(), expected, atol=tolerance, rtol=tolerance):
            error = float((out.double() - expected).abs().max())
            log.warning("the %s decode kernel disagrees with the plain computation (%s, window "
                        "%s: max error %.3g); attention uses the portable path", device.type,
                        shape, window, error)
            return False
    return True


def _plain_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  tables: torch.Tensor, lens: list[int], scale: float,
                  window: int | None) -> torch.Tensor:
    """paged_decode's contract, one sequence at a time, in q's dtype."""
    group = q.shape[1] // k_pool.shape[1]
    block_size = k_pool.shape[2]
    out = torch.zeros_like(q)
    for row, length in enumerate(lens):
        if length == 0:
            continue  # a padding row: zeros
        positions = torch.arange(max(length - window, 0) if window else 0, length)
        blocks, offsets = tables[row, positions // block_size], positions % block_size
        keys = k_pool[blocks, :, offsets].repeat_interleave(group, dim=1)  # [n, heads, d]
        values = v_pool[blocks, :, offsets].repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,nhd->hn", q[row], keys) * scale).softmax(-1)
        out[row] = torch.einsum("hn,nhd->hd", weights, values)
    return out


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
