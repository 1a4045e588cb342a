"""Rotary position embeddings, with the scaling variants Llama-family configs use.

The frequency formulas follow transformers' modeling_rope_utils operation for operation,
so that float32 results match Hugging Face bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.kernels import row_passes


def rope_frequencies(
    head_dim: int, rope: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2], attention scaling) for a normalised rope dict."""
    rope_type = rope["rope_type"]
    base = rope["rope_theta"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope_type in ("default", "dynamic"):
        return 1.0 / (base**exponents), 1.0
    if rope_type == "linear":
        return 1.0 / (base**exponents) / rope["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(1.0 / (base**exponents), rope), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(head_dim, rope, max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _llama3_frequencies(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor = rope["factor"]
    low_freq_factor = rope["low_freq_factor"]
    high_freq_factor = rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(
    head_dim: int, rope: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale attention logits."""
    base = rope["rope_theta"]
    original_max = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / original_max

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    dims = torch.arange(head_dim // 2, dtype=torch.float32)
    ramp = torch.clamp((dims - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k of a flat token batch, from a cos/sin table by position."""

    def __init__(
        self,
        head_dim: int,
        rope: dict[str, Any],
        max_position_embeddings: int,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        # Computed on the CPU (as transformers does at init), also when the model around
        # it is being built on the "meta" device; kept in float32 and cast per step.
        with torch.device("cpu"):
            inv_freq, scaling = rope_frequencies(head_dim, rope, max_position_embeddings)
            positions = torch.arange(max_position_embeddings, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos() * scaling, angles.sin() * scaling
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T]. Where the
        CPU pass fits (bfloat16, contiguous), q and k are rotated in place."""
        if all(row_passes.rope_fits(x, positions, self.cos) for x in (q, k)):
            row_passes.rope_in_place(q, positions, self.cos, self.sin)
            row_passes.rope_in_place(k, positions, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
