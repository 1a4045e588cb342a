"""A small GPTQ writer for tests, built from the format's definition, not from engine code.

It packs known integer codes the way AutoGPTQ / GPTQModel store them, so the engine's
reader can be checked against values chosen here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from engine.quant.gptq import GPTQWeight


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


def dequantize(weight: GPTQWeight) -> torch.Tensor:
    """float32 W [out, in] of the engine's unpacked layer, by the format's definition."""
    g = weight.g_idx
    w = (weight.q - weight.zeros[g]).float() * weight.scales[g].float()
    return w.t().contiguous()


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


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_gptq_model(
    model_dir: Path,
    out_dir: Path,
    bits: int,
    group_size: int,
    *,
    act_order: bool = False,
    sym: bool = True,
    v1: bool = True,
) -> tuple[Path, Path]:
    """A GPTQ checkpoint of a float model folder's shapes, with random codes per projection.

    Returns (gptq folder, float twin): the twin holds the weights the codes define
    (float32), everything else copied, so a float engine on it is the exact reference.
    """
    tensors = load_file(model_dir / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(tensors)):
        prefix, _, part = name.rpartition(".")
        if not (prefix.endswith(PROJECTIONS) and part == "weight"):
            packed[name] = dequantized[name] = tensors[name]
            continue
        n, k = tensors[name].shape
        fake = make_gptq(k, n, bits, group_size, act_order=act_order, sym=sym, v1=v1, seed=i)
        if bits == 8:  # 16x the levels: keep the weights as large as 4-bit ones (exact /16)
            fake.scales = fake.scales / 16
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            packed[f"{prefix}.{key}"] = getattr(fake, key)
        dequantized[name] = fake.weight().float().contiguous()
    folders = []
    for suffix, weights in (("gptq", packed), ("dequant", dequantized)):
        folder = out_dir / suffix
        shutil.copytree(model_dir, folder)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    config_path = folders[0] / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
        "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2", "lm_head": False,
    }
    config_path.write_text(json.dumps(config, indent=2))
    return folders[0], folders[1]
