"""int8 x int8 matmuls for int8 weights ("w8a8"): activations quantized per token.

On CPUs with int8 dot-product instructions (VNNI, AMX-INT8) `torch._int_mm` multiplies
int8 matrices with int32 accumulation at about twice torch's bfloat16 GEMM rate and
several times its weight-only int8 op. Each row of the activations is quantized on the
fly, symmetrically with its own scale (absmax / 127), so

    y[m, n] = x_scale[m] * sum_k xq[m, k] * qc[n, k] * w_scale[n]     (one group)

and the error per activation is at most x_scale / 2 = absmax / 254 of its row. The
quantization and the rescale are one C pass each (engine/kernels/row_passes.py): as
torch ops they cost about as much as the int8 GEMM between them.

BATCHINFER_INT8_ACTIVATIONS picks where this runs:
  auto (default)  where the CPU has the instructions (engine.device.cpu_has_int8_dot),
                  from the row count that the start-up measurement
                  (engine/quant/crossover.py) found faster, per shape
  on              at every row count, on any CPU (what tests use to run both paths)
  off             never: int8 layers stay weight-only
A shape whose `torch._int_mm` fails or disagrees with exact integer arithmetic once at
start-up stays weight-only, whatever the setting.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Hashable

import torch

from engine.device import cpu_has_int8_dot
from engine.quant.crossover import Kernel, setting, switch_rows

log = logging.getLogger(__name__)

ENV_VAR = "BATCHINFER_INT8_ACTIVATIONS"
_CHECKED_OUTPUTS = 64  # output features compared with exact arithmetic at start-up


@functools.cache
def int_mm_works(in_features: int, out_features: int) -> bool:
    """Whether `torch._int_mm` runs this shape here and matches exact integer arithmetic
    (at a decode row count and a prefill-sized odd one); logged when it does not."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8,
                           generator=generator)
    for rows in (1, 17):
        a = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
        try:
            got = torch._int_mm(a, weight.t())
        except RuntimeError as error:
            log.warning("torch._int_mm refuses [%d,%d]x[%d,%d] (%s): int8 layers of this "
                        "shape stay weight-only", rows, in_features, in_features,
                        out_features, error)
            return False
        # Exact in float64 (sums stay far below 2**53); a slice of the outputs keeps
        # this quick for the largest layers.
        expected = a.double() @ weight[:_CHECKED_OUTPUTS].double().t()
        if not torch.equal(got[:, :_CHECKED_OUTPUTS].double(), expected):
            log.warning("torch._int_mm disagrees with exact arithmetic at [%d,%d]x[%d,%d]: "
                        "int8 layers of this shape stay weight-only", rows, in_features,
                        in_features, out_features)
            return False
    return True


def applies(in_features: int, out_features: int) -> bool:
    """Whether int8 x int8 products run for this CPU shape at all, as
    BATCHINFER_INT8_ACTIVATIONS and this machine decide (used where no measurement picks
    the row count: the int4 tiles of engine/quant/int4_tiles.py, themselves measured
    against the packed kernel)."""
    value = setting(ENV_VAR)
    if value == "off" or (value == "auto" and not cpu_has_int8_dot()):
        return False
    return int_mm_works(in_features, out_features)


def first_rows(key: Hashable, weight_only: Kernel, w8a8: Kernel, in_features: int,
               out_features: int, dtype: torch.dtype, device: torch.device) -> float:
    """The row count from which a layer runs `w8a8` instead of `weight_only` (math.inf:
    never), as BATCHINFER_INT8_ACTIVATIONS and this machine decide; `key` names the
    layer's shape for the cached measurement."""
    # torch's CUDA int8 paths are not used (engine/quant/matmul.py says why).
    if device.type != "cpu" or not int_mm_works(in_features, out_features):
        return math.inf
    return switch_rows(ENV_VAR, cpu_has_int8_dot(), key, weight_only, w8a8, in_features,
                       dtype, device)
