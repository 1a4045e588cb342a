"""int4 weights for large batches: dequantize a tile of the weight at a time, fast GEMM.

torch's CPU int4 op (tinygemm) runs at a fraction of the float GEMM rate, whatever the
row count, so at prefill and big decode batches int4 would be slower than bfloat16. This
kernel instead dequantizes a tile of output features at a time (at most _TILE_ELEMENTS
weights, so the tile stays in cache between its dequantization and its GEMM) into one
reused buffer and multiplies by it with the float GEMM: the dequantization costs about
as much as a small-batch product, the GEMM runs at the float rate. No full dequantized
copy is ever held.

Packing: two codes per byte, per group of g inputs the low nibble holds input j and the
high nibble input j + g/2 (j < g/2), as two's complement (qc in [-8, 8)), so a tile
unpacks with shifts into the two contiguous halves of each group and one multiply by
the group's scale (and one add of its offset) gives W = qc * scale + offset: the
definition tinygemm computes as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.device import cpu_matmul_upcasts
from engine.kernels import row_passes
from engine.quant import int8_activations
from engine.scratch import scratch

# Weights per tile (1 MiB of bfloat16): with the tile's codes and the activations this
# stays in a core's L2 on current server CPUs.
_TILE_ELEMENTS = 1 << 19
# int8 tiles hold more weights (1 MiB of int8): torch's int8 GEMM costs about 0.1 ms a
# call over its arithmetic, so narrow tiles would pay that many times a layer.
_INT8_TILE_ELEMENTS = 1 << 20
_TILE_ROW_MULTIPLE = 16  # output features per tile: whole GEMM register blocks
_SCALE_ROWS = 4096  # output features per step of the load-time channel scales


def _tile_rows(elements: int, in_features: int) -> int:
    rows = elements // in_features // _TILE_ROW_MULTIPLE * _TILE_ROW_MULTIPLE
    return max(_TILE_ROW_MULTIPLE, rows)


class Int4Tiles:
    """y = x @ W.T from int4 codes, a dequantized tile of W at a time (module docstring)."""

    name = "int4_tiles"

    def __init__(self, qc: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 group_size: int, dtype: torch.dtype, device: torch.device):
        """qc int8 [N, K] in [-8, 8); scales, offsets float32 [K / group_size, N]."""
        n, k = qc.shape
        self.in_features = k
        self.group_size = group_size
        int8_rows = _tile_rows(_INT8_TILE_ELEMENTS, k)
        int8_widths = {min(int8_rows, n), n % int8_rows or int8_rows}  # full and last tile
        self.int8 = (dtype == torch.bfloat16 and device.type == "cpu"
                     and all(int8_activations.applies(k, width) for width in int8_widths))
        if self.int8:
            self.name = "int4_tiles_w8a8"
        self.tile_rows = int8_rows if self.int8 else _tile_rows(_TILE_ELEMENTS, k)
        # Where this dtype's GEMM is emulated (no bf16/fp16 instructions), tiles and
        # products are float32 over the same values (engine.layers.linear does the same).
        # int8 tiles start from the bfloat16 scales and offsets tinygemm holds.
        self.compute_dtype = (torch.bfloat16 if self.int8
                              else torch.float32 if cpu_matmul_upcasts(dtype) else dtype)
        groups = qc.view(n, k // group_size, 2, group_size // 2)
        self.packed = ((groups[:, :, 0] & 15) | (groups[:, :, 1] << 4)).to(device)
        # [N, n_groups, 1]: broadcast over each group's inputs in a tile.
        self.scales = scales.t().to(device, self.compute_dtype).contiguous()[..., None]
        if self.int8:
            # Offsets go into the int8 codes, per output feature: [N, n_groups, 1].
            self.offsets = None
            self.row_offsets = (None if offsets is None else
                                offsets.t().to(device, self.compute_dtype).contiguous()[..., None])
            self.channel_scales = self._channel_scales(qc)
            self.inverse_channel_scales = self.channel_scales.reciprocal()
            return
        # Offsets stay out of the tiles: x @ offsets-part = (x summed per group) @ offsets,
        # a [rows, n_groups] x [n_groups, N] product, cheaper than a pass over each tile.
        # Kept in the compute dtype, as tinygemm keeps its zeros: the same bytes.
        self.offsets = None if offsets is None else offsets.to(device, self.compute_dtype)

    def _channel_scales(self, qc: torch.Tensor) -> torch.Tensor:
        """max |W[o]| / 127 per output feature of the weight the tiles compute, float32."""
        maxima = []
        for start in range(0, len(qc), _SCALE_ROWS):  # bounded float32 scratch
            stop = start + _SCALE_ROWS
            codes = qc[start:stop]
            weight = codes.float().view(len(codes), -1, self.group_size)
            weight.mul_(self.scales[start:stop].float())
            if self.row_offsets is not None:
                weight.add_(self.row_offsets[start:stop].float())
            maxima.append(weight.abs().amax((1, 2)))
        return (torch.cat(maxima) / 127).clamp_min_(torch.finfo(torch.float32).tiny)

    def _dequantize(self, start: int, stop: int) -> torch.Tensor:
        """W[start:stop] in the compute dtype, in the shared scratch buffer."""
        packed = self.packed[start:stop]  # int8 [n, n_groups, group_size / 2]
        n = stop - start
        tile = scratch.get(n * self.in_features, self.compute_dtype).view(n, self.in_features)
        return row_passes.dequantize_int4(packed, self.scales[start:stop], self.group_size, tile)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return self._int8_product(x)
        xc = x.to(self.compute_dtype)
        n = len(self.packed)
        if self.tile_rows >= n:
            y = F.linear(xc, self._dequantize(0, n))
        else:
            y = torch.empty(x.shape[0], n, dtype=self.compute_dtype, device=x.device)
            for start in range(0, n, self.tile_rows):
                stop = min(start + self.tile_rows, n)
                y[:, start:stop] = F.linear(xc, self._dequantize(start, stop))
        if self.offsets is not None:
            group_sums = x.view(x.shape[0], -1, self.group_size).sum(-1, dtype=torch.float32)
            y = (group_sums @ self.offsets.float()).add_(y)
        return y.to(x.dtype)

    def _int8_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W requantized to int8 a tile at a time and x quantized per row."""
        xq, x_scale = row_passes.quantize_rows(x)  # bfloat16, contiguous (QuantLinear's)
        n = len(self.packed)
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        for start in range(0, n, self.tile_rows):
            stop = min(start + self.tile_rows, n)
            tile = scratch.get((stop - start) * self.in_features, torch.int8)
            tile = row_passes.requantize_int4(
                self.packed[start:stop], self.scales[start:stop],
                None if self.row_offsets is None else self.row_offsets[start:stop],
                self.group_size, self.inverse_channel_scales[start:stop],
                tile.view(stop - start, self.in_features))
            row_passes.scale_int32(row_passes.int_mm(xq, tile.t()), x_scale,
                                   self.channel_scales[start:stop], x.dtype,
                                   out=y[:, start:stop])
        return y

    def nbytes(self) -> int:
        tensors = (self.packed, self.scales, self.offsets)
        if self.int8:
            tensors += (self.row_offsets, self.channel_scales, self.inverse_channel_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
