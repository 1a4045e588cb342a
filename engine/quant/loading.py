"""Quantized projections built while the loader streams the checkpoint.

The loader hands every tensor of a projection (the modules `engine.layers.make_linear`
makes) to `QuantizedProjections.add`; once all of that projection's tensors in the
checkpoint have arrived, the finished layer comes back for the loader to put in place:

- GPTQ checkpoint: `qweight`, `qzeros`, `scales`, optional `g_idx` and `bias` ->
  QuantLinear.from_gptq. A projection the checkpoint keeps as a float `weight` (GPTQModel's
  `dynamic` exclusions) loads as a float linear.
- load-time ("rtn"): `weight`, optional `bias` -> QuantLinear.from_float, so each float
  weight exists only on the CPU and only while its layer is being built.

Only one projection's tensors are held at a time (more where a sharded checkpoint splits
one projection across files), never a dequantized copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from engine.quant.linear import QuantLinear, load_gptq_linear
from engine.quant.scheme import QuantScheme

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
FLOAT_PARTS = ("weight", "bias")


class QuantizedProjections:
    """Collects each projection's checkpoint tensors and builds its layer when all are in.

    shapes: prefix -> (in_features, out_features, has_bias) from the model's config.
    checkpoint_parts: prefix -> the tensor names the checkpoint holds for it ("qweight", ...).
    """

    def __init__(
        self,
        scheme: QuantScheme,
        shapes: Mapping[str, tuple[int, int, bool]],
        checkpoint_parts: Mapping[str, set[str]],
        dtype: torch.dtype,
        device: torch.device,
        source: str,
    ) -> None:
        self.scheme = scheme
        self.shapes = dict(shapes)
        self.dtype, self.device, self.source = dtype, device, source
        self.allowed = FLOAT_PARTS + (GPTQ_PARTS if scheme.method == "gptq" else ())
        self.expected = {p: set(checkpoint_parts.get(p, ())) for p in self.shapes}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.built: set[str] = set()
        if scheme.method == "rtn":
            self._check_rtn_group_size()

    def _check_rtn_group_size(self) -> None:
        """Fail before reading any tensor when the group size cannot fit every projection."""
        group = self.scheme.group_size
        if group == -1:
            return
        bad = sorted((k, p) for p, (k, _, _) in self.shapes.items() if k % group)
        if not bad:
            return
        common = math.gcd(*(k for k, _, _ in self.shapes.values()))
        fits = [g for g in range(2, group, 2) if common % g == 0]
        hint = f"e.g. quantization='int{self.scheme.bits}-g{fits[-1]}'" if fits else (
            "or a per-channel scheme ('int8')"
        )
        in_features, prefix = bad[0]
        raise ValueError(
            f"quantization={self.scheme.name!r}: group size {group} does not divide "
            f"{prefix}'s {in_features} input features; choose a group size that divides "
            f"every projection's ({hint})"
        )

    def add(self, prefix: str, part: str, tensor: torch.Tensor) -> nn.Module | None:
        """Take one checkpoint tensor; return the projection's layer once it is complete."""
        if part not in self.allowed:
            name = f"{prefix}.{part}"
            raise ValueError(f"unexpected weight {name!r} in checkpoint {self.source!r}")
        parts = self.pending.setdefault(prefix, {})
        parts[part] = tensor
        if set(parts) != self.expected[prefix]:
            return None
        del self.pending[prefix]
        layer = self._build(prefix, parts)
        self.built.add(prefix)
        return layer

    def missing(self) -> list[str]:
        """Names of the tensors the checkpoint lacks for projections never built."""
        names = []
        for prefix in self.shapes:
            if prefix not in self.built:
                needed = "qweight" if self.scheme.method == "gptq" else "weight"
                names.append(f"{prefix}.{needed}")
        return names

    def _build(self, prefix: str, parts: dict[str, torch.Tensor]) -> nn.Module:
        in_features, out_features, has_bias = self.shapes[prefix]
        bias = parts.get("bias")
        if has_bias and bias is None:
            raise ValueError(f"checkpoint {self.source!r} lacks weights: {prefix}.bias")
        if bias is not None:
            if not has_bias:
                raise ValueError(
                    f"unexpected weight {prefix + '.bias'!r} in checkpoint {self.source!r}"
                )
            _check_shape(f"{prefix}.bias", bias, (out_features,))
        weight = parts.get("weight")
        gptq_parts = [p for p in GPTQ_PARTS if p in parts]
        if weight is not None and gptq_parts:
            raise ValueError(f"{prefix}: the checkpoint has both a float weight and GPTQ tensors")
        if weight is None and self.scheme.method == "rtn":
            raise ValueError(f"checkpoint {self.source!r} lacks weights: {prefix}.weight")
        if weight is None:
            config = self.scheme.gptq
            qweight = parts.get("qweight")
            if qweight is not None:
                per = 32 // config.bits
                if in_features % per:
                    raise ValueError(
                        f"{prefix}: {in_features} input features do not pack into int32 "
                        f"words of {per} {config.bits}-bit codes"
                    )
                _check_shape(f"{prefix}.qweight", qweight, (in_features // per, out_features),
                             f" at bits={config.bits} ({per} codes per int32 word)")
            tensors = {f"{prefix}.{p}": t for p, t in parts.items()}
            return load_gptq_linear(tensors, prefix, config, bias, self.dtype, self.device)
        _check_shape(f"{prefix}.weight", weight, (out_features, in_features))
        if self.scheme.method == "rtn":
            return QuantLinear.from_float(
                weight, bias, self.scheme.bits, self.scheme.group_size,
                self.dtype, self.device, name=prefix,
            )  # fmt: skip
        # A projection the GPTQ checkpoint left in float: keep it so.
        layer = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
        layer.weight = nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(self.device, self.dtype), requires_grad=False)
        return layer


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], note: str = "") -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {shape}{note}"
        )
