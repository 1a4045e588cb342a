"""The CPU model's row-wise passes as C kernels (row_passes.c, built on first use by
engine/kernels/build.py): around the int8 and int4 matmuls, and RMSNorm,
SiLU-and-multiply and the rotary embedding between the matmuls.

Each function computes the torch expression in its docstring, which is what runs where
no compiler builds the kernels (`available` is False) or the tensors do not fit them
(not on the CPU, not bfloat16, not contiguous); the kernels do it in one pass over
memory instead of several. The quantized passes and the rotary embedding equal torch
bit for bit; the norm and activation may differ by one bfloat16 rounding step, as their
sums and exponentials run in another order (tests/engine/test_engine_row_passes.py and
test_engine_rope.py check them).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build
from engine.scratch import scratch

_SOURCE = Path(__file__).with_name("row_passes.c")
_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = build.load(_SOURCE, "int8/int4 CPU matmuls")
    if library is None:
        return None
    pointer, whole, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "batchinfer_quantize_rows": [pointer, whole, whole, pointer, pointer, flag],
        "batchinfer_scale_int32": [pointer, whole, whole, pointer, pointer, pointer, whole, flag,
                                   flag],
        "batchinfer_requantize_int4": [pointer, whole, whole, whole, pointer, pointer, pointer,
                                       pointer, flag],
        "batchinfer_dequantize_int4": [pointer, whole, whole, whole, pointer, pointer, flag, flag],
        "batchinfer_rms_norm": [pointer, pointer, pointer, whole, whole, ctypes.c_float, pointer,
                                flag],
        "batchinfer_silu_mul": [pointer, pointer, whole, whole, whole, pointer, flag],
        "batchinfer_rope": [pointer, whole, whole, whole, pointer, pointer, pointer, flag],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = None, argtypes
    return library


def available() -> bool:
    return _library() is not None


def _contiguous_cpu(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.device.type == "cpu" and x.dtype == dtype and x.is_contiguous()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of x [M, K]: (q int8 [M, K], scale float32 [M, 1]) with
    scale = (max |x[m]| / 127).clamp_min(float32 tiny) and q = round(x * (1 / scale))."""
    library = _library()
    if library is None or not _contiguous_cpu(x, torch.bfloat16):
        absmax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True,
                                          dtype=torch.float32)
        scale = absmax.div_(127).clamp_min_(_TINY)
        return torch.mul(x, scale.reciprocal()).round_().to(torch.int8), scale
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    library.batchinfer_quantize_rows(x.data_ptr(), rows, cols, q.data_ptr(), scale.data_ptr(),
                                     torch.get_num_threads())
    return q, scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm(a, b) into the thread's reused int32 scratch: a fresh [M, N] int32
    result per call costs page faults that take longer than writing it. Valid until
    the next call on this thread."""
    out = scratch.get(a.shape[0] * b.shape[1], torch.int32).view(a.shape[0], b.shape[1])
    return torch._int_mm(a, b, out=out)


def scale_int32(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """((acc * row_scale) * col_scale).to(dtype) for int32 acc [M, N], float32 row_scale
    [M, 1] and col_scale [N]; dtype bfloat16 or float32. Written into `out` where given
    (for example a column slice of a wider output), else a new tensor."""
    library = _library()
    fits = (_contiguous_cpu(acc, torch.int32) and _contiguous_cpu(row_scale, torch.float32)
            and _contiguous_cpu(col_scale, torch.float32)
            and dtype in (torch.bfloat16, torch.float32)
            and (out is None or (out.dtype == dtype and out.device.type == "cpu"
                                 and out.stride(1) == 1)))
    if library is None or not fits:
        result = (acc * row_scale).mul_(col_scale).to(dtype)
        return result if out is None else out.copy_(result)
    rows, cols = acc.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    library.batchinfer_scale_int32(acc.data_ptr(), rows, cols, row_scale.data_ptr(),
                                   col_scale.data_ptr(), out.data_ptr(), out.stride(0),
                                   dtype == torch.float32, torch.get_num_threads())
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Weights from int4 codes into out [n, K] (bfloat16 or float32): packed int8
    [n, K / group_size, group_size / 2] holds, per group, input j in the low nibble and
    input j + group_size / 2 in the high one (two's complement); scales [n, K /
    group_size, 1] in out's dtype. out[o, g*G + j] = code * scales[o, g]."""
    library = _library()
    fits = (_contiguous_cpu(packed, torch.int8) and out.is_contiguous()
            and out.dtype in (torch.bfloat16, torch.float32)
            and _contiguous_cpu(scales, out.dtype))
    if library is None or not fits:
        halves = out.view(*packed.shape[:2], 2, packed.shape[2])
        # Arithmetic shifts of int8 sign-extend each nibble back to its code.
        halves[:, :, 0].copy_(packed << 4 >> 4)
        halves[:, :, 1].copy_(packed >> 4)
        return out.view(len(packed), -1, group_size).mul_(scales).view(out.shape)
    rows, cols = out.shape
    library.batchinfer_dequantize_int4(packed.data_ptr(), rows, cols, group_size,
                                       scales.data_ptr(), out.data_ptr(),
                                       out.dtype == torch.float32, torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm of x over its last dimension (float32 inside, the
    weight applied in x's dtype). With `add`, x += add first, in place: x is then the
    residual stream and the norm is of the sum."""
    library = _library()
    fits = (_contiguous_cpu(x, torch.bfloat16) and _contiguous_cpu(weight, torch.bfloat16)
            and (add is None or (_contiguous_cpu(add, torch.bfloat16) and add.shape == x.shape)))
    if library is None or not fits:
        if add is not None:
            x.add_(add)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    out = torch.empty_like(x)
    cols = x.shape[-1]
    library.batchinfer_rms_norm(x.data_ptr(), None if add is None else add.data_ptr(),
                                weight.data_ptr(), x.numel() // cols, cols, eps, out.data_ptr(),
                                torch.get_num_threads())
    return out


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for 2-D gate and up, which may be the two halves of one fused
    projection's output (rows of both the same distance apart)."""
    library = _library()
    fits = (library is not None and gate.dim() == 2 and gate.shape == up.shape
            and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.stride(1) == 1
                    for t in (gate, up))
            and gate.stride(0) == up.stride(0))
    if not fits:
        return torch.nn.functional.silu(gate) * up
    rows, cols = gate.shape
    out = torch.empty(rows, cols, dtype=gate.dtype)
    library.batchinfer_silu_mul(gate.data_ptr(), up.data_ptr(), rows, cols, gate.stride(0),
                                out.data_ptr(), torch.get_num_threads())
    return out


def rope_fits(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether rope_in_place runs x [T, heads, head_dim] at positions [T] with a cos/sin
    table like `table`."""
    return (_library() is not None and _contiguous_cpu(x, torch.bfloat16) and x.dim() == 3
            and _contiguous_cpu(positions, torch.int64) and _contiguous_cpu(table, torch.float32)
            and table.shape[-1] == x.shape[-1])


def rope_in_place(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> None:
    """x [T, heads, head_dim] = x * cos + rotate_half(x) * sin in place, as engine/rope.py
    computes it in bfloat16 (cos, sin: its float32 tables, rows taken at positions [T]);
    only where rope_fits."""
    tokens, heads, head_dim = x.shape
    _library().batchinfer_rope(x.data_ptr(), tokens * heads, head_dim, heads,
                               positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                               torch.get_num_threads())


def requantize_int4(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group_size: int, inverse_channel_scales: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """int8 codes of one scale per output feature from int4 codes, into out int8 [n, K]:
    round((code * scale + offset) * inverse_channel_scales[o]) within [-127, 127]. packed
    as for dequantize_int4; scales and offsets (None: zero) bfloat16 [n, K / group_size]
    (or with a trailing 1); inverse_channel_scales float32 [n]."""
    library = _library()
    fits = (library is not None and _contiguous_cpu(packed, torch.int8)
            and _contiguous_cpu(scales, torch.bfloat16)
            and (offsets is None or _contiguous_cpu(offsets, torch.bfloat16))
            and _contiguous_cpu(inverse_channel_scales, torch.float32)
            and _contiguous_cpu(out, torch.int8))
    rows, cols = out.shape
    if not fits:
        weights = dequantize_int4(packed.view(rows, -1, group_size // 2),
                                  scales.float().view(rows, -1, 1), group_size,
                                  torch.empty(rows, cols))
        if offsets is not None:
            weights.view(rows, -1, group_size).add_(offsets.float().view(rows, -1, 1))
        weights.mul_(inverse_channel_scales.view(rows, 1))
        return out.copy_(weights.round_().clamp_(-127, 127))
    library.batchinfer_requantize_int4(
        packed.data_ptr(), rows, cols, group_size, scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(), inverse_channel_scales.data_ptr(),
        out.data_ptr(), torch.get_num_threads())
    return out
