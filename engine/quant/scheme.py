"""Which quantization a load uses: the `quantization=` argument and the checkpoint decide.

    None          the checkpoint decides: GPTQ if it has a GPTQ config, else float weights
    "gptq"        require a GPTQ checkpoint (config.json's quantization_config or
                  quantize_config.json); bits and group size come from its config
    "int8"        round-to-nearest at load time, 8 bits, one scale per output channel
    "int4"        round-to-nearest at load time, 4 bits, groups of 128 input features
    "int4-g64"    ... groups of 64 (any even size dividing every projection's inputs);
    "int8-g128"   "int8-gN" likewise gives int8 one scale per group of N inputs

A QuantScheme's `name` is its canonical spelling ("int8", "int4-g128", and for GPTQ
checkpoints "gptq-int4-g64" or "gptq-int8" for one group per channel): what
`LLM.quantization` and `stats()["quantization"]` report, and a valid argument again
(a "gptq-..." name must match the checkpoint's own config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.quant.gptq import QuantConfig, read_quant_config

DEFAULT_INT4_GROUP_SIZE = 128
QUANTIZATION_OPTIONS = (
    "None (as the checkpoint is), 'gptq', 'int8', 'int4', 'int4-g<N>', 'int8-g<N>'"
)
_RTN_PATTERN = re.compile(r"int([48])(?:-g([1-9][0-9]*))?")


@dataclass(frozen=True)
class QuantScheme:
    """How every projection (q/k/v/o, gate/up/down) of the model is held."""

    method: str  # "gptq": read packed from the checkpoint; "rtn": rounded at load time
    bits: int
    group_size: int  # -1: one group over all input features (per output channel)
    gptq: QuantConfig | None = None  # the checkpoint's config when method == "gptq"

    @property
    def name(self) -> str:
        group = "" if self.group_size == -1 else f"-g{self.group_size}"
        prefix = "gptq-" if self.method == "gptq" else ""
        return f"{prefix}int{self.bits}{group}"


def parse_rtn(quantization: str) -> QuantScheme:
    """"int8" / "int4" / "int4-g64" / "int8-g128" -> a load-time scheme; ValueError otherwise."""
    match = _RTN_PATTERN.fullmatch(quantization)
    if match is None:
        raise ValueError(
            f"unknown quantization {quantization!r}; options: {QUANTIZATION_OPTIONS}"
        )
    bits = int(match.group(1))
    default_group = DEFAULT_INT4_GROUP_SIZE if bits == 4 else -1
    group_size = int(match.group(2)) if match.group(2) else default_group
    if bits == 4 and group_size % 2:
        raise ValueError(f"quantization {quantization!r}: int4 needs an even group size")
    return QuantScheme("rtn", bits, group_size)


def resolve_quantization(quantization: str | None, model_dir: str | Path) -> QuantScheme | None:
    """The scheme for loading model_dir with `quantization=`; ValueError explains a mismatch."""
    checkpoint = read_quant_config(model_dir)
    gptq = None if checkpoint is None else _gptq_scheme(checkpoint, model_dir)
    if quantization is None:
        return gptq
    if not isinstance(quantization, str):
        raise ValueError(
            f"quantization must be a string or None, got {type(quantization).__name__}; "
            f"options: {QUANTIZATION_OPTIONS}"
        )
    requested = quantization.strip().lower()
    if requested == "gptq" or requested.startswith("gptq-"):
        if gptq is None:
            raise ValueError(
                f"quantization={quantization!r}, but {str(model_dir)!r} is not a GPTQ checkpoint "
                "(no quantization_config in config.json, no quantize_config.json)"
            )
        if requested not in ("gptq", gptq.name):
            raise ValueError(
                f"quantization={quantization!r} does not match the checkpoint, which is "
                f"{gptq.name!r}"
            )
        return gptq
    scheme = parse_rtn(requested)
    if gptq is not None:
        raise ValueError(
            f"{str(model_dir)!r} is already quantized ({gptq.name}); load-time "
            f"quantization={quantization!r} needs float weights: pass quantization=None"
        )
    return scheme


def _gptq_scheme(config: QuantConfig, model_dir: str | Path) -> QuantScheme:
    if config.lm_head:
        raise ValueError(
            f"{str(model_dir)!r}: a quantized lm_head (lm_head: true) is not supported"
        )
    return QuantScheme("gptq", config.bits, config.group_size, config)
