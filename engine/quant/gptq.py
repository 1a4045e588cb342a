"""GPTQ checkpoints as AutoGPTQ / GPTQModel write them: config, tensor checks, unpacking.

Per quantized linear with K input and N output features, `bits` in {4, 8},
`n_groups = K // group_size` (1 when group_size is -1) and `per = 32 // bits`:

- `qweight` int32 [K / per, N]: packed along the input dim; word r of column o holds
  input rows r * per + j at bits [j * bits, (j + 1) * bits), j = 0 in the low bits.
- `qzeros` int32 [n_groups, N / per]: packed the same way but along the output dim.
- `scales` float16 [n_groups, N].
- `g_idx` int32 [K]: the group of each input row (non-trivial with act-order).

W[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]. Format "gptq" (v1) stores
z - 1, "gptq_v2" stores z. Unpacking masks before the v1 `+ 1`, as the reference
kernels do, so a v1 zero of 0 (stored as -1, which wraps) comes back as 2**bits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """The parts of a GPTQ `quantization_config` that decide how tensors are read."""

    bits: int
    group_size: int  # -1: one group over all input features (per output channel)
    # desc_act and sym are informational: g_idx and qzeros carry what the math needs.
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1, zeros stored minus one) or "gptq_v2"
    lm_head: bool = False  # whether lm_head is quantized too

    @property
    def v1_zero_offset(self) -> bool:
        return self.checkpoint_format == "gptq"


def parse_quant_config(raw: Mapping, source: str = "quantization_config") -> QuantConfig:
    """Validate a `quantization_config` dict; ValueError names the bad field."""
    method = raw.get("quant_method", raw.get("method", "gptq"))
    if str(method).lower() != "gptq":
        raise ValueError(f"{source}: quant_method {method!r} is not supported (only 'gptq')")
    bits = raw.get("bits")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{source}: bits={bits!r} is not supported (expected 4 or 8)")
    group_size = raw.get("group_size", -1)
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"{source}: group_size={group_size!r} must be -1 or a positive int")
    # GPTQModel writes both keys; older AutoGPTQ only `checkpoint_format`; absent means v1.
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    if raw.get("format") and raw.get("checkpoint_format") and raw["format"] != fmt:
        raise ValueError(
            f"{source}: format={raw['format']!r} contradicts checkpoint_format={fmt!r}"
        )
    if fmt not in FORMATS:
        raise ValueError(f"{source}: checkpoint format {fmt!r} is not supported ({FORMATS})")
    # GPTQModel's `dynamic`: regex -> per-module overrides, or "-:regex" for modules left
    # unquantized. Those stay float in the checkpoint and load as such; other bits or
    # group sizes per module are not supported.
    overrides = [key for key in raw.get("dynamic") or {} if not str(key).startswith("-:")]
    if overrides:
        raise ValueError(
            f"{source}: per-module overrides in 'dynamic' are not supported ({overrides[0]!r})"
        )
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", True)),
        checkpoint_format=fmt,
        lm_head=bool(raw.get("lm_head", False)),
    )


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The model's GPTQ config from config.json or quantize_config.json; None if unquantized."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        raw = json.loads(config_path.read_text()).get("quantization_config")
        if raw is not None:
            return parse_quant_config(raw, f"{config_path}: quantization_config")
    legacy_path = model_dir / "quantize_config.json"
    if legacy_path.is_file():
        return parse_quant_config(json.loads(legacy_path.read_text()), str(legacy_path))
    return None


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R * 32 / bits, C]: values packed along dim 0, low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32 / bits]: values packed along dim 1, low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


@dataclass
class GPTQWeight:
    """A GPTQ linear unpacked to integers: W[o, i] = (q[i, o] - zeros[g, o]) * scales[g, o]."""

    q: torch.Tensor  # int32 [K, N], values in [0, 2**bits)
    zeros: torch.Tensor  # int32 [n_groups, N], v1 offset already applied
    scales: torch.Tensor  # [n_groups, N], as stored (float16)
    g_idx: torch.Tensor  # int64 [K], group of each input row

    @property
    def in_features(self) -> int:
        return self.q.shape[0]


def unpack_gptq(
    qweight: torch.Tensor | None,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    v1_zero_offset: bool,
    name: str = "linear",
) -> GPTQWeight:
    """Check one layer's tensors against the format and unpack them.

    g_idx may be None (old AutoGPTQ checkpoints without act-order): rows then belong to
    group i // group_size. ValueError messages name the layer and the tensor.
    """
    for tensor_name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tensor is None:
            raise ValueError(f"{name}.{tensor_name} is missing from the checkpoint")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: bits={bits} is not supported (expected 4 or 8)")
    per = 32 // bits
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"{name}: qweight/qzeros must be 2-D int32, got {qweight.dtype} "
            f"{tuple(qweight.shape)} / {qzeros.dtype} {tuple(qzeros.shape)}"
        )
    if not scales.is_floating_point():
        raise ValueError(f"{name}.scales: expected a float tensor, got {scales.dtype}")
    in_features, out_features = qweight.shape[0] * per, qweight.shape[1]
    if group_size == -1:
        group_size = in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"{name}: group_size={group_size} does not divide in_features={in_features}"
        )
    if out_features % per:
        raise ValueError(f"{name}: out_features={out_features} is not a multiple of {per}")
    n_groups = in_features // group_size
    expected = {
        "qzeros": (qzeros, (n_groups, out_features // per)),
        "scales": (scales, (n_groups, out_features)),
    }
    if g_idx is not None:
        expected["g_idx"] = (g_idx, (in_features,))
    for tensor_name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}.{tensor_name}: shape {tuple(tensor.shape)} does not match {shape} "
                f"(bits={bits}, group_size={group_size}, in_features={in_features}, "
                f"out_features={out_features})"
            )
    if g_idx is None:
        g_idx = torch.arange(in_features, device=qweight.device) // group_size
    else:
        g_idx = g_idx.long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise ValueError(f"{name}.g_idx: values must lie in [0, {n_groups})")
    zeros = unpack_cols(qzeros, bits)
    if v1_zero_offset:
        zeros = zeros + 1
    return GPTQWeight(unpack_rows(qweight, bits), zeros, scales, g_idx)

