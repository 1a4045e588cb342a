"""The quantization tests pin each batch-size kernel switch (engine/quant/crossover.py)
off, so that the kernel a layer gets does not depend on a timing taken on this machine;
test_quant_batch_kernels.py turns them on, and to auto, itself."""

from __future__ import annotations

import pytest

from engine.quant.int8_activations import ENV_VAR as INT8_ACTIVATIONS
from engine.quant.matmul import INT4_TILES_ENV_VAR as INT4_TILES


@pytest.fixture(autouse=True)
def _batch_kernel_switches_off(monkeypatch) -> None:
    monkeypatch.setenv(INT8_ACTIVATIONS, "off")
    monkeypatch.setenv(INT4_TILES, "off")
