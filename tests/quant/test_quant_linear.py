"""QuantLinear: packed kernels against the float64 definition, RTN bounds, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant import QuantLinear
from engine.quant import matmul as quant_matmul
from tests.quant.gptq_packer import FakeGPTQ, make_gptq

K, N = 512, 48  # N % 16 == 0 and K a multiple of 256: every CPU kernel path applies

# Error of the packed matmul relative to the output's largest value. float32: only
# summation order differs. bfloat16: scales and zeros are rounded to bfloat16 (8 bits of
# mantissa, relative error <= 2**-9 each) and so is the output.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _from_gptq(fake: FakeGPTQ, dtype: torch.dtype, bias: torch.Tensor | None = None):
    return QuantLinear.from_gptq(
        fake.qweight, fake.qzeros, fake.scales, fake.g_idx, bias,
        bits=fake.bits, group_size=fake.group_size, v1_zero_offset=fake.v1,
        dtype=dtype, device="cpu",
    )  # fmt: skip


def _cpu_kernel(bits: int, dtype: torch.dtype) -> str:
    """What QuantLinear picks on CPU: torch's kernels are fast for bfloat16 only."""
    if dtype != torch.bfloat16:
        return "dequant_chunked"
    return "int4_tinygemm" if bits == 4 else "int8_weight_only"


def _check_against_definition(layer, fake: FakeGPTQ, dtype, rows=5, bias=None):
    x = torch.randn(rows, fake.q.shape[0], generator=torch.Generator().manual_seed(1))
    x = x.to(dtype)  # the reference sees exactly the activations the kernel sees
    expected = x.double() @ fake.weight().t()
    if bias is not None:
        expected += bias.to(dtype).double()
    y = layer(x)
    assert y.dtype == dtype and y.shape == expected.shape
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} ({layer.kernel_name})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("sym", "v1"), [(True, True), (False, True), (False, False)], ids=["sym", "asym", "asym_v2"]
)
def test_from_gptq_matches_definition(bits, group_size, act_order, sym, v1, dtype):
    fake = make_gptq(K, N, bits, group_size, act_order=act_order, sym=sym, v1=v1)
    layer = _from_gptq(fake, dtype)
    assert layer.kernel_name == _cpu_kernel(bits, dtype)
    # One group over all inputs needs no reordering, whatever the processing order was.
    assert (layer.perm is not None) == (act_order and group_size != -1)
    _check_against_definition(layer, fake, dtype)


def test_bias_and_leading_dims():
    fake = make_gptq(K, N, 4, 128, sym=False)
    bias = torch.randn(N)
    layer = _from_gptq(fake, torch.float32, bias=bias)
    x = torch.randn(2, 3, K)
    expected = (x.double() @ fake.weight().t() + bias.double()).float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_casts_activations_to_its_dtype_and_back():
    layer = _from_gptq(make_gptq(K, N, 4, 128), torch.bfloat16)
    x = torch.randn(4, K)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x.bfloat16()).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("bits", "n", "group_size", "no_kernels"),
    [
        (4, 24, 128, False),  # N not a multiple of 16
        (4, N, 16, False),  # group size below the kernel's 32
        (4, N, -1, True),  # no int4 op available
        (8, N, 64, True),  # no int8 op available
        (8, N, -1, True),
    ],
)
def test_dequant_fallback_matches_definition(monkeypatch, bits, n, group_size, no_kernels, dtype):
    monkeypatch.setattr(quant_matmul, "_FALLBACK_CHUNK", 96)  # several chunks, cut mid-group
    if no_kernels:
        monkeypatch.setattr(quant_matmul, "_has_kernel", lambda op, device: False)
    fake = make_gptq(K, n, bits, group_size, act_order=True, sym=False)
    layer = _from_gptq(fake, dtype)
    assert layer.kernel_name == "dequant_chunked"
    _check_against_definition(layer, fake, dtype)


def test_act_order_groups_of_unequal_size_rejected():
    fake = make_gptq(K, N, 4, 64, act_order=True)
    fake.g_idx[fake.g_idx == 1] = 0  # group 0 now holds 128 rows, group 1 none
    with pytest.raises(ValueError, match=r"linear\.g_idx: every group must hold exactly 64 rows"):
        _from_gptq(fake, torch.float32)


def test_from_float_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"bits=3 is not supported"):
        QuantLinear.from_float(torch.randn(N, K), None, 3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"group_size=100 does not divide in_features=512"):
        QuantLinear.from_float(torch.randn(N, K), None, 4, 100, torch.float32, "cpu")


def _rtn_error_bound(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int):
    """Worst case |y - y_float| per output: sum_k |x_k| * step_k / 2.

    Round-to-nearest moves each weight by at most half its group's step: max|w| / 127 for
    symmetric int8, (max - min) / 15 for asymmetric int4 (a float zero adds no rounding).
    """
    n, k = weight.shape
    groups = weight.view(n, k // group_size, group_size)
    spread = groups.abs().amax(-1) if bits == 8 else groups.amax(-1) - groups.amin(-1)
    step = spread / (127 if bits == 8 else 15)
    half_step = (step / 2).repeat_interleave(group_size, dim=1)  # [N, K]
    return x.abs().double() @ half_step.double().t()


@pytest.mark.parametrize(
    ("bits", "group_size", "max_relative_rms"),
    [(8, -1, 0.012), (8, 128, 0.012), (4, 128, 0.13), (4, -1, 0.16)],
)
def test_from_float_error_within_rounding_bound(bits, group_size, max_relative_rms):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(N, K, generator=gen) * 0.05
    x = torch.randn(7, K, generator=gen)
    layer = QuantLinear.from_float(weight, None, bits, group_size, torch.float32, "cpu")
    y, y_float = layer(x), F.linear(x, weight)
    size = K if group_size == -1 else group_size
    bound = _rtn_error_bound(weight, x, bits, size) * (1 + 1e-4) + 1e-5  # + float32 slack
    assert torch.all((y - y_float).abs().double() <= bound)
    # Typical error: rounding noise has rms step / sqrt(12). For Gaussian weights the
    # step is ~3.2 sigma / 127 (int8 per channel of 512: ~0.7%) or ~5.2 sigma / 15
    # (int4 over 128: ~10%; ~12% per channel of 512). Bounds leave ~30% headroom.
    relative_rms = (y - y_float).norm() / y_float.norm()
    assert relative_rms < max_relative_rms


def test_from_float_bf16_close_to_float32_layer():
    weight = torch.randn(N, K) * 0.05
    x = torch.randn(3, K)
    for bits in (4, 8):
        fp32 = QuantLinear.from_float(weight, None, bits, 128, torch.float32, "cpu")
        bf16 = QuantLinear.from_float(weight, None, bits, 128, torch.bfloat16, "cpu")
        assert bf16.kernel_name == _cpu_kernel(bits, torch.bfloat16)
        y32, y16 = fp32(x), bf16(x.bfloat16())
        assert ((y16.float() - y32).abs().max() / y32.abs().max()) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("bits", "group_size", "code_bytes", "per_group_values"),
    [
        (8, -1, 1.0, 1),  # int8 codes + one scale per output channel
        (4, 128, 0.5, 2),  # half-byte codes + (scale, zero) per 128 inputs
        (4, 32, 0.5, 2),
    ],
)
def test_weight_bytes(bits, group_size, code_bytes, per_group_values, dtype):
    n, k = 2048, 768
    layer = QuantLinear.from_float(torch.randn(n, k), None, bits, group_size, dtype, "cpu")
    n_groups = 1 if group_size == -1 else k // group_size
    scale_bytes = n_groups * n * per_group_values * dtype.itemsize
    assert layer.weight_bytes() == n * k * code_bytes + scale_bytes
    # int8 ~1/4 and int4 ~1/8 of float32, plus the scales (<= 1/16 for groups of 32).
    assert layer.weight_bytes() / (n * k * 4) <= code_bytes / 4 + 1 / 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, -1), (8, 64), (8, -1)])
def test_cuda_matches_definition(bits, group_size, dtype):
    fake = make_gptq(K, N, bits, group_size, act_order=True, sym=False)
    layer = QuantLinear.from_gptq(
        fake.qweight, fake.qzeros, fake.scales, fake.g_idx, None,
        bits=bits, group_size=group_size, v1_zero_offset=True, dtype=dtype, device="cuda",
    )  # fmt: skip
    tinygemm = bits == 4 and dtype == torch.bfloat16
    assert layer.kernel_name == ("int4_tinygemm" if tinygemm else "dequant_chunked")
    x = torch.randn(5, K).to(dtype)
    expected = x.double() @ fake.weight().t()
    y = layer(x.cuda()).cpu()
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < 1e-2, f"relative error {error:.2e} ({layer.kernel_name})"


@pytest.mark.parametrize(("k", "group_size"), [(172, -1), (512, 8), (520, 40)])
def test_int8_op_only_for_groups_of_multiples_of_16(k, group_size):
    """torch's CPU int8 op reads 16 inputs at a time with no tail loop and crashes on other
    widths (stories260K's 172-wide down_proj did): those layers take the fallback."""
    fake = make_gptq(k, N, 8, group_size, sym=False)
    layer = _from_gptq(fake, torch.bfloat16)
    assert layer.kernel_name == "dequant_chunked"
    _check_against_definition(layer, fake, torch.bfloat16)
    per_channel = QuantLinear.from_float(torch.randn(N, k), None, 8, -1, torch.bfloat16, "cpu")
    assert per_channel.kernel_name == ("int8_weight_only" if k % 16 == 0 else "dequant_chunked")


@pytest.mark.parametrize(("group_size", "sym"), [(-1, True), (-1, False), (64, False),
                                                 (128, True)])
@pytest.mark.parametrize("rows", [5, 40])  # torch's op below 32 rows, codes matmul above
def test_int8_kernel_both_paths_match_definition(monkeypatch, group_size, sym, rows):
    monkeypatch.setattr(quant_matmul, "_FALLBACK_CHUNK", 96)  # several slices per group
    fake = make_gptq(K, N, 8, group_size, act_order=True, sym=sym)
    layer = _from_gptq(fake, torch.bfloat16)
    assert layer.kernel_name == "int8_weight_only"
    _check_against_definition(layer, fake, torch.bfloat16, rows=rows)
