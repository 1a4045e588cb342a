"""The CPU decode kernel (paged_decode.c), built on first use by engine/kernels/build.py.

Where no compiler works, `supported` is False and attention uses its portable PyTorch
path: slower on CPUs, same results.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels import build

_SOURCE = Path(__file__).with_name("paged_decode.c")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class _Kernel:
    library: ctypes.CDLL
    max_head_dim: int
    max_group: int
    max_block_size: int
    dtypes: frozenset[torch.dtype]


@functools.cache
def _kernel() -> _Kernel | None:
    library = build.load(_SOURCE, "CPU decode attention")
    if library is None:
        return None
    limits = [ctypes.c_int64() for _ in range(3)]
    has_f16 = library.batchinfer_kernel_limits(*(ctypes.byref(limit) for limit in limits))
    library.batchinfer_paged_decode.restype = None
    library.batchinfer_paged_decode.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    )
    dtypes = {torch.float32, torch.bfloat16} | ({torch.float16} if has_f16 else set())
    return _Kernel(library, *(limit.value for limit in limits), frozenset(dtypes))


def supported(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> bool:
    """Whether `paged_decode` can run this shape on this machine."""
    kernel = _kernel()
    return (
        kernel is not None
        and dtype in kernel.dtypes
        and head_dim <= kernel.max_head_dim
        and num_heads // num_kv_heads <= kernel.max_group
        and block_size <= kernel.max_block_size
    )


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    window: int,
) -> None:
    """engine.kernels.paged_decode's work on CPU tensors, written into out (all contiguous;
    window 0: none). Only where `supported` says so."""
    kernel = _kernel()
    assert kernel is not None
    batch, num_heads, head_dim = q.shape
    _, kv_heads, block_size, _ = k_pool.shape
    kernel.library.batchinfer_paged_decode(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), out.data_ptr(), batch, num_heads, kv_heads, head_dim,
        block_size, block_tables.shape[1], window, scale, _DTYPE_CODES[q.dtype],
        torch.get_num_threads(),
    )
