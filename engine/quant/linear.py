"""Packed-weight linear layers: GPTQ checkpoints and load-time round-to-nearest (RTN).

Every layer is first brought to one load-time form, `Centered` (engine/quant/matmul.py),
per group g of `group_size` consecutive input features (after the act-order
permutation, see below):

    W[o, k] = qc[o, k] * scales[g, o] + offsets[g, o]

with `qc` the integer code centred on zero (q - 2**(bits-1), so int8 holds it for both
widths). GPTQ gives offsets = (2**(bits-1) - z) * s, zero for symmetric checkpoints.
A kernel from engine/quant/matmul.py then packs that form for its op (`pick_kernel`
says which, and why); none keeps a dequantized float weight.

Act-order (desc_act): GPTQ's g_idx scatters each group over the input features. The
rows are sorted by group once at load so groups are contiguous again; each call then
gathers the activation columns in that order (one index_select), never the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engine.quant.gptq import SUPPORTED_BITS, QuantConfig, unpack_gptq
from engine.quant.matmul import Centered, pick_kernel, tensor_bytes


def _check_even_int4_groups(bits: int, group_size: int, name: str) -> None:
    # Packed int4 keeps two neighbouring input features per byte; an odd group size
    # would split bytes between groups. Published checkpoints use powers of two.
    if bits == 4 and group_size % 2:
        raise ValueError(f"{name}: int4 needs an even group size, got {group_size}")


def _act_order_perm(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    """Input order that makes each group contiguous; None when it already is."""
    k = g_idx.numel()
    if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=k // group_size)
    if not torch.all(counts == group_size):
        # GPTQ's act-order gives every group exactly group_size rows; anything else
        # is a damaged g_idx rather than a layout to support.
        raise ValueError(f"{name}.g_idx: every group must hold exactly {group_size} rows")
    return torch.argsort(g_idx, stable=True)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held packed (4 or 8 bits); build with from_gptq / from_float.

    The packed tensors are plain attributes, not buffers: they are laid out for one op
    on one device, so `.to()` must not move or cast them. Build the layer where it runs.
    forward computes in `dtype` (the dtype given at build time) and returns x's dtype.
    """

    def __init__(
        self,
        w: Centered,
        perm: torch.Tensor | None,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = w.qc.shape
        self.bits = w.bits
        self.group_size = w.group_size
        self.dtype = dtype
        self.device = device
        self.perm = None if perm is None else perm.to(device)
        self.bias = None if bias is None else bias.detach().to(device, dtype)
        self.kernel = pick_kernel(w, dtype, device)

    @property
    def kernel_name(self) -> str:
        return self.kernel.name

    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor | None,
        qzeros: torch.Tensor | None,
        scales: torch.Tensor | None,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        v1_zero_offset: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        name: str = "linear",
    ) -> QuantLinear:
        """From one layer's checkpoint tensors (see engine.quant.gptq for their layout).

        No `sym` argument: symmetric checkpoints store the midpoint as their zero points,
        so the stored zeros alone define the weights. `name` prefixes error messages.
        """
        unpacked = unpack_gptq(
            qweight, qzeros, scales, g_idx, bits, group_size, v1_zero_offset, name
        )
        k = unpacked.in_features
        group_size = k if group_size == -1 else group_size
        _check_even_int4_groups(bits, group_size, name)
        perm = _act_order_perm(unpacked.g_idx, group_size, name)
        q = unpacked.q if perm is None else unpacked.q[perm]
        mid = 1 << (bits - 1)
        s = unpacked.scales.float()
        zeros = unpacked.zeros
        offsets = None if torch.all(zeros == mid) else (mid - zeros).float() * s
        w = Centered((q - mid).t().to(torch.int8).contiguous(), s, offsets, group_size, bits)
        return cls(w, perm, bias, dtype, device)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        name: str = "linear",
    ) -> QuantLinear:
        """Round-to-nearest at load time; weight is [out, in], group_size -1 = per channel.

        8 bits: symmetric, codes in [-127, 127], scale = max|w| / 127, so the error per
        weight is at most scale / 2. 4 bits: asymmetric, 16 levels from the group's min
        to its max (scale = range / 15) because a zero point costs nothing in the int4
        kernel and symmetric int4 wastes a level and half the range on skewed groups.
        """
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}: bits={bits} is not supported (expected 4 or 8)")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"{name}: weight must be a 2-D float tensor")
        n, k = weight.shape
        group_size = k if group_size == -1 else group_size
        if group_size <= 0 or k % group_size:
            raise ValueError(f"{name}: group_size={group_size} does not divide in_features={k}")
        _check_even_int4_groups(bits, group_size, name)
        groups = weight.detach().to("cpu", torch.float32).view(n, k // group_size, group_size)
        if bits == 8:
            scale = (groups.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            codes = torch.round(groups / scale[..., None]).clamp(-127, 127)
            offsets = None
        else:
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
            codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15) - 8
            offsets = (low + 8 * scale).t().contiguous()
        qc = codes.to(torch.int8).view(n, k)
        w = Centered(qc, scale.t().contiguous(), offsets, group_size, bits)
        return cls(w, None, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.device.type:
            raise RuntimeError(f"QuantLinear built for {self.device} got input on {x.device}")
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        x2 = x2.contiguous() if self.perm is None else x2.index_select(1, self.perm)
        y = self.kernel(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes this layer holds: packed codes, scales and zeros, permutation, bias."""
        return self.kernel.nbytes() + tensor_bytes(self.perm, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel_name}"
        )


def load_gptq_linear(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    config: QuantConfig,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> QuantLinear:
    """The QuantLinear for checkpoint linear `prefix` (e.g. "model.layers.0.mlp.up_proj")."""
    return QuantLinear.from_gptq(
        tensors.get(f"{prefix}.qweight"),
        tensors.get(f"{prefix}.qzeros"),
        tensors.get(f"{prefix}.scales"),
        tensors.get(f"{prefix}.g_idx"),
        bias,
        config.bits,
        config.group_size,
        config.v1_zero_offset,
        dtype,
        device,
        name=prefix,
    )
