"""The packed-weight matmul kernels behind QuantLinear: y = x @ W.T from packed codes.

QuantLinear (engine/quant/linear.py) first brings every layer to one load-time form,
`Centered`, per group g of `group_size` consecutive input features (after the act-order
permutation):

    W[o, k] = qc[o, k] * scales[g, o] + offsets[g, o]

with `qc` the integer code centred on zero (q - 2**(bits-1), so int8 holds it for both
widths). A kernel then packs that form for its op; none keeps a dequantized float weight:

- int4 with bfloat16 activations: torch's tinygemm ops, `_weight_int4pack_mm_for_cpu`
  on CPU and `_weight_int4pack_mm` on CUDA. Both compute, per group,
  w = (q - 8) * scale + zero with q in [0, 16) (verified against the reference
  dequantization by the tests), so scale = s and zero = offset, packed [groups, N, 2].
  They take group sizes 32/64/128/256 only; a larger group that is a multiple of one of
  those is split into equal sub-groups that repeat its scale and zero, which is exact.
- int8 with bfloat16 activations on CPU: `_weight_int8pack_mm` (int8 weight, one scale
  per output channel) once per group, for groups of a multiple of 16 inputs (the op has
  no tail loop and crashes on other widths); from 32 rows on (prefill, big batches),
  where that op is slow, a bfloat16 matmul over the same codes (exact in bfloat16),
  scaled after. Non-zero offsets add (sum of x over the group) @ offsets[group] in
  float32. This keeps grouped and asymmetric 8-bit GPTQ exact
  instead of requantizing it per channel, for one op call per group. On CPUs with int8
  dot-product instructions, from a row count measured per shape at start-up, the same
  codes multiply activations quantized per row instead, int8 x int8
  (engine/quant/int8_activations.py); the name says which: int8_weight_only,
  int8_weight_only+w8a8 (switching) or int8_w8a8.
- int4 on CPU, for many rows: tiles of the weight dequantized into a reused buffer and
  a float GEMM, or on CPUs with int8 dot-product instructions requantized to int8 and
  multiplied int8 x int8 (engine/quant/int4_tiles.py), from a row count measured per
  shape; below it tinygemm (int4_tinygemm+tiles, int4_tinygemm+tiles_w8a8). Where one
  wins at every row count measured, it alone is built (int4_tinygemm, int4_tiles...).
- anything else (float32/float16 activations, odd shapes or group sizes, int8 on CUDA,
  ops missing): dequantize a slice of input features at a time inside the matmul
  (`_DequantChunked`). `pick_kernel` says why each case goes where it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.kernels import row_passes
from engine.layers import linear
from engine.quant import int8_activations
from engine.quant.crossover import MEASURED_ROWS, switch_rows
from engine.quant.int4_tiles import Int4Tiles

# Large-batch int4 kernel switch (engine/quant/crossover.py): auto | on | off.
INT4_TILES_ENV_VAR = "BATCHINFER_INT4_TILES"

_INT4_KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# Input features dequantized at a time by the portable fallback: bounds its scratch
# to out_features * 1024 activation-dtype values per call.
_FALLBACK_CHUNK = 1024
# torch's CPU int8 op costs about as much per row at 128 rows as at one: from this many
# rows on, _Int8PerGroup multiplies by its codes in bfloat16 instead, which is faster
# there, grouped or not; the op stays ahead for decode-sized batches.
_INT8_OP_MAX_ROWS = 32


@dataclass
class Centered:
    """The load-time form described in the module docstring."""

    qc: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [n_groups, N]
    offsets: torch.Tensor | None  # float32 [n_groups, N]; None when all zero
    group_size: int  # n_groups * group_size == K
    bits: int


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Int8PerGroup:
    """int8 weight-only op per group (one call when the group spans all inputs)."""

    name = "int8_weight_only"

    def __init__(self, w: Centered, dtype: torch.dtype, device: torch.device):
        self.group_size = w.group_size
        # [n_groups, N, group_size]: the op needs each group's weight contiguous.
        self.qweight = (
            w.qc.view(len(w.qc), -1, w.group_size).transpose(0, 1).contiguous().to(device)
        )
        self.scales = w.scales.to(device, dtype)
        self.offsets = None if w.offsets is None else w.offsets.to(device)
        n, k = w.qc.shape
        shape = (n, k, w.group_size, dtype, device.type)
        self.switch_rows = int8_activations.first_rows(
            shape, self._weight_only, self._int8_activations, k, n, dtype, device
        )
        if self.switch_rows == 0:
            self.name = "int8_w8a8"
        elif self.switch_rows < math.inf:
            self.name = "int8_weight_only+w8a8"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.shape[0] >= self.switch_rows
        y = self._int8_activations(x) if wide else self._weight_only(x)
        if self.offsets is not None:
            group_sums = x.view(x.shape[0], -1, self.group_size).sum(-1, dtype=torch.float32)
            y = y + group_sums @ self.offsets
        return y.to(x.dtype)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """float32 sum over groups of x_g @ (codes_g * scales_g).T, activations as given."""
        if x.shape[0] >= _INT8_OP_MAX_ROWS:
            return self._codes_matmul(x)
        if len(self.qweight) == 1:
            return torch._weight_int8pack_mm(x, self.qweight[0], self.scales[0])
        # Sum the per-group products in float32: bfloat16 partial sums would lose bits.
        y = torch.zeros(x.shape[0], self.scales.shape[1], device=x.device)
        for g, (qweight, scales) in enumerate(zip(self.qweight, self.scales, strict=True)):
            xg = x[:, g * self.group_size : (g + 1) * self.group_size]
            y += torch._weight_int8pack_mm(xg, qweight, scales)
        return y

    def _int8_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum with x quantized per row (engine/quant/int8_activations.py):
        int8 x int8 products with int32 accumulation, rescaled in float32 (rounded to
        x's dtype in the same pass where no offsets are added after)."""
        xq, x_scale = row_passes.quantize_rows(x)
        if len(self.qweight) == 1:
            # Straight to x's dtype where no offsets follow (__call__'s cast is then free).
            dtype = x.dtype if self.offsets is None else torch.float32
            return row_passes.scale_int32(row_passes.int_mm(xq, self.qweight[0].t()), x_scale,
                                          self.scales[0].float(), dtype)
        y = torch.zeros(x.shape[0], self.scales.shape[1], device=x.device)
        for g, (codes, scales) in enumerate(zip(self.qweight, self.scales, strict=True)):
            xg = xq[:, g * self.group_size : (g + 1) * self.group_size]
            y.addcmul_(row_passes.int_mm(xg, codes.t()), scales)
        return y.mul_(x_scale)

    def _codes_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """float32 sum over groups of (x_g @ codes_g.T) * scales_g, for many rows.

        int8 codes are exact in bfloat16, so this is an ordinary bfloat16 matmul over a
        slice of the codes at a time (at most _FALLBACK_CHUNK inputs: bounded scratch),
        scaled per output channel after: close to a plain bfloat16 matmul, well ahead of
        torch's op at these sizes.
        """
        y = torch.zeros(x.shape[0], self.scales.shape[1], device=x.device)
        size = self.group_size
        for g, (codes, scales) in enumerate(zip(self.qweight, self.scales, strict=True)):
            part = None
            for start in range(0, size, _FALLBACK_CHUNK):
                stop = min(start + _FALLBACK_CHUNK, size)
                xs = x[:, g * size + start : g * size + stop]
                product = linear(xs, codes[:, start:stop].to(x.dtype)).float()
                part = product if part is None else part + product
            y += part * scales.float()
        return y

    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales, self.offsets)


def _int4_kernel_group_size(group_size: int) -> int | None:
    return next((g for g in _INT4_KERNEL_GROUP_SIZES if group_size % g == 0), None)


def _scales_and_zeros(w: Centered, kernel_group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[K / kernel_group_size, N, 2] (scale, zero) in the activation dtype, as the op wants."""
    zeros = torch.zeros_like(w.scales) if w.offsets is None else w.offsets
    repeat = w.group_size // kernel_group_size
    packed = torch.stack([w.scales, zeros], dim=-1).repeat_interleave(repeat, dim=0)
    return packed.to(dtype).contiguous()


class _Int4Tinygemm:
    """torch's int4 weight-only ops: `*_for_cpu` on CPU, the tinygemm CUDA kernel on CUDA."""

    name = "int4_tinygemm"

    def __init__(self, w: Centered, dtype: torch.dtype, device: torch.device):
        self.group_size = _int4_kernel_group_size(w.group_size)
        self.scales_and_zeros = _scales_and_zeros(w, self.group_size, dtype).to(device)
        q = (w.qc.int() + 8).to(device)  # [N, K] in [0, 16)
        self.cuda = device.type == "cuda"
        if self.cuda:
            # The CUDA op takes two values per byte, the even input feature in the high
            # nibble, and tiles K by inner_k_tiles * 16.
            k = q.shape[1]
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            pairs = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.qweight = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        else:
            # The CPU op takes unpacked int32 values; its tiling argument is unused.
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

    @staticmethod
    def supports(n: int, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
        if _int4_kernel_group_size(group_size) is None:
            return False
        if device.type == "cpu":
            return n % 16 == 0 and _has_kernel("_weight_int4pack_mm_for_cpu", device)
        return (
            device.type == "cuda"
            and dtype == torch.bfloat16  # the CUDA kernel is bfloat16-only
            and n % 8 == 0
            and torch.cuda.get_device_capability(device) >= (8, 0)
            and _has_kernel("_weight_int4pack_mm", device)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            op = torch.ops.aten._weight_int4pack_mm
        else:
            op = torch.ops.aten._weight_int4pack_mm_for_cpu
        return op(x, self.qweight, self.group_size, self.scales_and_zeros)

    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales_and_zeros)


class _DequantChunked:
    """Portable fallback: dequantize a slice of input features at a time inside the matmul.

    Slices hold whole groups (or lie inside one group), so scales and zeros broadcast
    over a [N, groups, width] view instead of being gathered per input feature.
    """

    name = "dequant_chunked"

    def __init__(self, w: Centered, dtype: torch.dtype, device: torch.device):
        self.bits = w.bits
        self.in_features = w.qc.shape[1]
        self.group_size = w.group_size
        self.chunk = _chunk_columns(w.group_size, w.bits)
        width = min(self.chunk, w.group_size)  # input features per group inside a slice
        self.group_codes = width // 2 if w.bits == 4 else width  # codes per row of a group
        offsets = torch.zeros_like(w.scales) if w.offsets is None else w.offsets
        if w.bits == 4:
            # Two codes per byte, even input feature in the low nibble. Codes stay
            # unsigned (q = qc + 8), so the constant moves into the offsets.
            q = (w.qc + 8).to(torch.uint8)
            self.qweight = (q[:, 0::2] | q[:, 1::2] << 4).to(device)
            offsets = offsets - 8 * w.scales
        else:
            self.qweight = w.qc.to(device)
        self.scales = w.scales.t().to(device, dtype).contiguous()  # [N, n_groups]
        self.offsets = None if not offsets.any() else offsets.t().to(device, dtype).contiguous()

    def _dequant(self, codes: torch.Tensor, first_group: int, dtype: torch.dtype) -> torch.Tensor:
        n = codes.shape[0]
        groups = codes.view(n, -1, self.group_codes).to(dtype)
        span = slice(first_group, first_group + groups.shape[1])
        scales = self.scales[:, span, None]
        if self.offsets is None:
            return (groups * scales).view(n, -1)
        return torch.addcmul(self.offsets[:, span, None], groups, scales).view(n, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x.shape[0], self.scales.shape[0], device=x.device)
        for start in range(0, self.in_features, self.chunk):
            stop = min(start + self.chunk, self.in_features)
            first_group = start // self.group_size
            if self.bits == 8:
                w = self._dequant(self.qweight[:, start:stop], first_group, x.dtype)
                y += linear(x[:, start:stop], w)
                continue
            packed = self.qweight[:, start // 2 : stop // 2]
            low = self._dequant(packed & 15, first_group, x.dtype)
            y += linear(x[:, start:stop:2], low)
            high = self._dequant(packed >> 4, first_group, x.dtype)
            y += linear(x[:, start + 1 : stop : 2], high)
        return y.to(x.dtype)

    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales, self.offsets)


def _chunk_columns(group_size: int, bits: int) -> int:
    """Input features per fallback step: whole groups, or a divisor of one large group."""
    if group_size <= _FALLBACK_CHUNK:
        return group_size * (_FALLBACK_CHUNK // group_size)
    step = 2 if bits == 4 else 1  # a 4-bit slice must not split a byte
    return max(c for c in range(step, _FALLBACK_CHUNK + 1, step) if group_size % c == 0)


def pick_kernel(w: Centered, dtype: torch.dtype, device: torch.device):
    if device.type == "cpu":
        # torch's CPU int8/int4 kernels are vectorized for bfloat16 activations only:
        # with float32 or float16 they are an order of magnitude or more slower than
        # dequantizing slices.
        if dtype != torch.bfloat16:
            return _DequantChunked(w, dtype, device)
        # The int8 op reads each group's inputs 16 at a time with no tail loop: other
        # widths (a 172-wide down_proj, say) crash it (torch 2.13, AVX512).
        if w.bits == 8 and w.group_size % 16 == 0 and _has_kernel("_weight_int8pack_mm", device):
            return _Int8PerGroup(w, dtype, device)
    # torch's CUDA int8 op is not used: it is far slower than dequantizing slices, let
    # alone a bfloat16 matmul.
    if w.bits == 4 and _Int4Tinygemm.supports(len(w.qc), w.group_size, dtype, device):
        return _int4_kernel(w, dtype, device)
    return _DequantChunked(w, dtype, device)


class _BySize:
    """Two kernels for one layer: `small` below `switch_rows` rows, `large` from there on."""

    def __init__(self, small, large, switch_rows: float):
        self.name = f"{small.name}+{large.name.removeprefix('int4_')}"
        self.small, self.large, self.switch_rows = small, large, switch_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.large if x.shape[0] >= self.switch_rows else self.small)(x)

    def nbytes(self) -> int:
        return self.small.nbytes() + self.large.nbytes()


def _int4_kernel(w: Centered, dtype: torch.dtype, device: torch.device):
    """tinygemm for few rows, tiles of dequantized weights for many (engine/quant/
    int4_tiles.py), switching where measured; one of them alone where it wins at every
    measured row count (then only its packed weights are kept)."""
    tinygemm = _Int4Tinygemm(w, dtype, device)
    if device.type != "cpu":  # the tiles are measured against the CPU kernel only
        return tinygemm
    tiles = Int4Tiles(w.qc, w.scales, w.offsets, w.group_size, dtype, device)
    n, k = w.qc.shape
    shape = (n, k, w.group_size, w.offsets is not None, dtype, device.type)
    rows = switch_rows(INT4_TILES_ENV_VAR, True, shape, tinygemm, tiles, k, dtype, device)
    if rows == math.inf:
        return tinygemm
    if rows <= MEASURED_ROWS[0]:
        return tiles
    return _BySize(tinygemm, tiles, rows)
