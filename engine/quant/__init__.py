"""Weight quantization: GPTQ checkpoints and load-time int8/int4 rounding (see DESIGN.md)."""

from engine.quant.gptq import (
    QuantConfig,
    parse_quant_config,
    read_quant_config,
    unpack_gptq,
)
from engine.quant.linear import QuantLinear, load_gptq_linear
from engine.quant.scheme import QuantScheme, resolve_quantization

__all__ = [
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "load_gptq_linear",
    "parse_quant_config",
    "read_quant_config",
    "resolve_quantization",
    "unpack_gptq",
]
