"""A small GPTQ writer for tests, built from the format's definition, not from engine code.

It packs known integer codes the way AutoGPTQ / GPTQModel store them, so the engine's
reader can be checked against values chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit words held in int64 as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> int32 [R * bits / 32, C]; row r*per + j sits at bits j*bits..."""
    per = 32 // bits
    rows = values.long().reshape(-1, per, values.shape[1])
    words = torch.zeros(rows.shape[0], values.shape[1], dtype=torch.int64)
    for j in range(per):
        words |= rows[:, j, :] << (bits * j)
    return _to_int32(words)


def pack_along_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> int32 [R, C * bits / 32], the column analogue of pack_along_rows."""
    return pack_along_rows(values.t(), bits).t().contiguous()


@dataclass
class FakeGPTQ:
    """A random GPTQ layer: its checkpoint tensors and the truth they encode."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    q: torch.Tensor  # [K, N] codes
    zeros: torch.Tensor  # [n_groups, N] true zero points
    bits: int
    group_size: int  # as written in the config (-1 allowed)
    v1: bool

    def weight(self) -> torch.Tensor:
        """W [N, K] in float64 from the definition W[o, i] = (q - z[g(i)]) * s[g(i)]."""
        g = self.g_idx.long()
        w = (self.q - self.zeros[g]).double() * self.scales[g].double()
        return w.t()


def make_gptq(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    *,
    act_order: bool = False,
    sym: bool = True,
    v1: bool = True,
    seed: int = 0,
) -> FakeGPTQ:
    gen = torch.Generator().manual_seed(seed)
    levels = 1 << bits
    size = in_features if group_size == -1 else group_size
    n_groups = in_features // size
    q = torch.randint(0, levels, (in_features, out_features), generator=gen)
    if sym:
        zeros = torch.full((n_groups, out_features), levels // 2)
    else:
        # v1 cannot store a zero point of 0 (it would be written as -1), so start at 1.
        zeros = torch.randint(1 if v1 else 0, levels, (n_groups, out_features), generator=gen)
    scales = (torch.rand(n_groups, out_features, generator=gen) * 0.02 + 0.001).half()
    if act_order:
        # GPTQ's desc_act: the input at position j of the processing order is in group j // size.
        order = torch.randperm(in_features, generator=gen)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_features) // size).int()
    else:
        g_idx = (torch.arange(in_features) // size).int()
    stored_zeros = zeros - 1 if v1 else zeros
    return FakeGPTQ(
        qweight=pack_along_rows(q, bits),
        qzeros=pack_along_cols(stored_zeros, bits),
        scales=scales,
        g_idx=g_idx,
        q=q,
        zeros=zeros,
        bits=bits,
        group_size=group_size,
        v1=v1,
    )
