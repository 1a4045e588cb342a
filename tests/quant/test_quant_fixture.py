"""The real GPTQModel 7.6 checkpoint (shared fixture): read, dequantize, run each linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.quant import QuantConfig, QuantLinear, load_gptq_linear, read_quant_config
from engine.quant.gptq import unpack_gptq
from tests.quant.gptq_packer import dequantize

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _layer(tensors: dict, prefix: str) -> list[torch.Tensor]:
    return [tensors[f"{prefix}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")]


@pytest.fixture(scope="module")
def checkpoint(gptq_int4_model: Path):
    fp32_twin = gptq_int4_model.with_name(gptq_int4_model.name + "-fp32")
    tensors = load_file(gptq_int4_model / "model.safetensors")
    prefixes = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    return tensors, load_file(fp32_twin / "model.safetensors"), prefixes


def test_reads_gptqmodel_config(gptq_int4_model):
    assert read_quant_config(gptq_int4_model) == QuantConfig(
        bits=4, group_size=64, desc_act=False, sym=True, checkpoint_format="gptq"
    )


def test_every_linear_is_quantized(checkpoint):
    _, _, prefixes = checkpoint
    attention = {f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ATTENTION}
    mlp = {f"model.layers.{i}.mlp.{n}" for i in range(4) for n in MLP}
    assert set(prefixes) == attention | mlp


def test_dequantized_weights_close_to_fp32_twin(checkpoint):
    tensors, fp32, prefixes = checkpoint
    for prefix in prefixes:
        unpacked = unpack_gptq(*_layer(tensors, prefix), 4, 64, v1_zero_offset=True)
        assert torch.all(unpacked.zeros == 8), "sym v1: stored 7, zero point 8"
        weight, reference = dequantize(unpacked), fp32[f"{prefix}.weight"]
        assert weight.shape == reference.shape
        # 4-bit symmetric codes over groups of 64 random-normal weights: the step is about
        # 2 * 2.4 sigma / 15, so rounding alone leaves ~9% rms; GPTQ trades weight error
        # for output error and lands at 11-13% here. A wrong zero, scale or bit order
        # gives errors of order 100%.
        error = (weight - reference).norm() / reference.norm()
        assert error < 0.15, f"{prefix}: relative weight error {error:.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quant_linear_matches_dequantized_matmul(checkpoint, gptq_int4_model, dtype):
    tensors, _, prefixes = checkpoint
    config = read_quant_config(gptq_int4_model)
    for prefix in prefixes:
        layer = load_gptq_linear(tensors, prefix, config, None, dtype, "cpu")
        assert layer.kernel_name == (
            "int4_tinygemm" if dtype == torch.bfloat16 else "dequant_chunked"
        )
        unpacked = unpack_gptq(*_layer(tensors, prefix), 4, 64, v1_zero_offset=True)
        x = torch.randn(9, layer.in_features).to(dtype)
        expected = x.double() @ dequantize(unpacked).double().t()
        error = (layer(x).double() - expected).abs().max() / expected.abs().max()
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), f"{prefix}: {error:.2e}"


def test_missing_scales_in_real_checkpoint_named(checkpoint, gptq_int4_model):
    tensors, _, _ = checkpoint
    prefix = "model.layers.2.mlp.down_proj"
    damaged = {k: v for k, v in tensors.items() if k != f"{prefix}.scales"}
    config = read_quant_config(gptq_int4_model)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.scales is missing"):
        load_gptq_linear(damaged, prefix, config, None, torch.float32, "cpu")


def test_quant_linear_holds_an_eighth_of_fp32(checkpoint):
    tensors, fp32, prefixes = checkpoint
    held = sum(
        QuantLinear.from_gptq(
            *_layer(tensors, p), None, 4, 64, True, torch.float32, "cpu"
        ).weight_bytes()
        for p in prefixes
    )
    float_bytes = sum(fp32[f"{p}.weight"].numel() * 4 for p in prefixes)
    # codes: 1/8 of float32; (scale, zero) float32 pairs per 64 inputs: another 1/32.
    assert held == pytest.approx(float_bytes * (1 / 8 + 1 / 32))
