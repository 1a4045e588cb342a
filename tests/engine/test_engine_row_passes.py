"""The C row passes around the int8/int4 CPU matmuls equal their torch expressions bit
for bit (engine/kernels/row_passes.py), at odd shapes and on several threads."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import row_passes

pytestmark = pytest.mark.skipif(not row_passes.available(), reason="no C compiler builds the kernels")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(("rows", "cols"), [(1, 16), (3, 768), (257, 2048), (64, 1000)])
def test_quantize_rows_equals_torch(rows, cols, threads):
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, cols, generator=generator) * 3).to(torch.bfloat16)
    x[0, :5] = 0  # exact zeros
    if rows > 2:
        x[1] = 0  # an all-zero row gets the smallest positive scale
        x[2, 7] = 1e4  # one outlier
    q, scale = row_passes.quantize_rows(x)
    absmax = x.float().abs().amax(1, keepdim=True)
    expected_scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
    expected = (x.float() * expected_scale.reciprocal()).round().to(torch.int8)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, expected)
    assert q.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(1, 16), (5, 2304), (300, 768)])
def test_scale_int32_equals_torch(rows, cols, dtype, threads):
    generator = torch.Generator().manual_seed(cols)
    acc = torch.randint(-(1 << 20), 1 << 20, (rows, cols), dtype=torch.int32, generator=generator)
    row_scale = torch.rand(rows, 1, generator=generator) / 100
    col_scale = torch.rand(cols, generator=generator) / 100
    got = row_passes.scale_int32(acc, row_scale, col_scale, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, ((acc * row_scale) * col_scale).to(dtype))


def test_int_mm_reuses_its_buffer_and_equals_torch():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=generator)
    first = row_passes.int_mm(a, b.t())
    assert torch.equal(first, torch._int_mm(a, b.t()))
    again = row_passes.int_mm(a[:17], b.t())
    assert again.data_ptr() == first.data_ptr()
    assert torch.equal(again, torch._int_mm(a[:17], b.t()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols", "group_size"), [(1, 32, 32), (48, 768, 128), (33, 2048, 64)])
def test_dequantize_int4_equals_torch(rows, cols, group_size, dtype, threads):
    generator = torch.Generator().manual_seed(cols + group_size)
    codes = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=generator)
    scales = (torch.rand(rows, cols // group_size, 1, generator=generator) / 10).to(dtype)
    groups = codes.view(rows, -1, 2, group_size // 2)
    packed = (groups[:, :, 0] & 15) | (groups[:, :, 1] << 4)
    out = torch.empty(rows, cols, dtype=dtype)
    got = row_passes.dequantize_int4(packed, scales, group_size, out)
    assert got.data_ptr() == out.data_ptr()
    expected = (codes.to(dtype).view(rows, -1, group_size) * scales).view(rows, cols)
    assert torch.equal(got, expected)


def test_without_the_kernels_the_torch_expressions_give_the_same(monkeypatch):
    """Bit for bit for the quantized passes, within a rounding step for the norm and
    activation; a strided rescale output leaves the columns around it alone."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 256, generator=generator).to(torch.bfloat16)
    acc = torch.randint(-999, 999, (9, 48), dtype=torch.int32, generator=generator)
    row_scale, col_scale = torch.rand(9, 1, generator=generator), torch.rand(48, generator=generator)
    packed = torch.randint(-128, 128, (48, 2, 32), dtype=torch.int8, generator=generator)
    scales = torch.rand(48, 2, 1, generator=generator).to(torch.bfloat16)

    offsets = (torch.randn(48, 2, 1, generator=generator) / 10).to(torch.bfloat16)
    inverse = 127 / (8 * scales.float().amax((1, 2)) + offsets.float().abs().amax((1, 2)))
    wide = torch.zeros(9, 60, dtype=torch.bfloat16)

    def run():
        tile = torch.empty(48, 128, dtype=torch.bfloat16)
        codes = torch.empty(48, 128, dtype=torch.int8)
        return (*row_passes.quantize_rows(x),
                row_passes.scale_int32(acc, row_scale, col_scale, torch.bfloat16),
                row_passes.scale_int32(acc, row_scale, col_scale, torch.bfloat16,
                                       out=wide[:, 6:54]).clone(), wide.clone(),
                row_passes.dequantize_int4(packed, scales, 64, tile).clone(),
                row_passes.requantize_int4(packed, scales, offsets, 64, inverse, codes).clone(),
                row_passes.requantize_int4(packed, scales, None, 64, inverse, codes).clone(),
                row_passes.rms_norm(x.clone(), x[0].clone(), 1e-5),
                row_passes.silu_and_mul(x[:, :128], x[:, 128:]))

    with_kernels = run()
    monkeypatch.setattr(row_passes, "_library", lambda: None)
    without = run()
    for kernel, portable in zip(with_kernels[:-2], without[:-2], strict=True):
        assert torch.equal(kernel, portable)
    for kernel, portable in zip(with_kernels[-2:], without[-2:], strict=True):
        assert _bf16_steps_apart(kernel, portable).max() <= 1


def _bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values lie between a and b, elementwise (same signs); values
    both within 1e-30 of zero (silu's far negative tail) count as equal."""
    steps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    return steps.masked_fill((a.float().abs() < 1e-30) & (b.float().abs() < 1e-30), 0)


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (7, 768), (300, 100)])
def test_rms_norm_within_one_rounding_of_torch(rows, cols, with_add, threads):
    generator = torch.Generator().manual_seed(cols)
    x = (torch.randn(rows, cols, generator=generator) * 4).to(torch.bfloat16)
    add = (torch.randn(rows, cols, generator=generator) * 4).to(torch.bfloat16) if with_add else None
    weight = (torch.rand(cols, generator=generator) + 0.5).to(torch.bfloat16)
    residual = x.clone()
    if add is not None:
        residual += add
    h = residual.float()
    expected = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = row_passes.rms_norm(x, weight, 1e-6, add)
    assert torch.equal(x, residual)  # the residual stream, updated in place
    steps = _bf16_steps_apart(got, expected)
    assert steps.max() <= 1
    assert (steps == 0).float().mean() > 0.99


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(1, 16), (9, 2048), (200, 172)])
def test_silu_and_mul_within_one_rounding_of_torch(rows, cols, fused, threads):
    generator = torch.Generator().manual_seed(rows)
    both = (torch.randn(rows, 2 * cols, generator=generator) * 6).to(torch.bfloat16)
    both[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails, zeros
    gate, up = both[:, :cols], both[:, cols:]
    if not fused:
        gate, up = gate.contiguous(), up.contiguous()
    expected = torch.nn.functional.silu(gate) * up
    steps = _bf16_steps_apart(row_passes.silu_and_mul(gate, up), expected)
    assert steps.max() <= 1
    assert (steps == 0).float().mean() > 0.99
