"""Weight quantization: GPTQ checkpoints and load-time int8/int4 rounding (see DESIGN.md)."""

from engine.quant.gptq import (
    QuantConfig,
    dequantize,
    parse_quant_config,
    read_quant_config,
    unpack_gptq,
)
from engine.quant.linear import QuantLinear, load_gptq_linear

__all__ = [
    "QuantConfig",
    "QuantLinear",
    "dequantize",
    "load_gptq_linear",
    "parse_quant_config",
    "read_quant_config",
    "unpack_gptq",
]
