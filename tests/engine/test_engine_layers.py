"""bfloat16 / float16 matmuls computed in float32 on CPUs that only emulate those dtypes.

The predicate depends on the machine, so these tests force it both ways: what they check
must hold on CPUs with and without native bfloat16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine.layers
from engine import LLM, SamplingParams
from engine.device import cpu_has_bf16, cpu_matmul_upcasts
from engine.layers import linear, make_linear


@pytest.fixture(params=[True, False], ids=["upcast", "native"])
def upcasts(request, monkeypatch) -> bool:
    monkeypatch.setattr(
        engine.layers, "cpu_matmul_upcasts", lambda dtype: request.param and dtype != torch.float32
    )
    return request.param


def _inputs(dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    weight = (torch.randn(160, 96, generator=g) * 0.1).to(dtype)
    bias = torch.randn(160, generator=g).to(dtype)
    return x, weight, bias


def test_predicate():
    assert cpu_matmul_upcasts(torch.float32) is False
    assert cpu_matmul_upcasts(torch.bfloat16) is (not cpu_has_bf16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_is_float32_matmul_rounded_once(upcasts, dtype):
    x, weight, bias = _inputs(dtype, rows=7)
    y = linear(x, weight, bias)
    assert y.dtype == dtype
    upcast = F.linear(x.float(), weight.float(), bias.float()).to(dtype)
    native = F.linear(x, weight, bias)
    assert torch.equal(y, upcast if upcasts else native)
    # Both accumulate in float32, so they differ by summation order: one rounding step.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(native.float(), upcast.float(), rtol=eps, atol=eps)


@pytest.mark.parametrize("chunk_rows", [7, 160], ids=["chunks-and-remainder", "one-chunk"])
def test_upcast_chunks_give_the_whole_product(monkeypatch, chunk_rows):
    # The weight converted a few output features at a time (160 = 22 x 7 + 6), through the
    # same reused buffer, with a bias, over a batch with leading dimensions.
    monkeypatch.setattr(engine.layers, "cpu_matmul_upcasts", lambda dtype: True)
    monkeypatch.setattr(engine.layers, "UPCAST_CHUNK_ELEMENTS", chunk_rows * 96)
    x, weight, bias = _inputs(torch.bfloat16, rows=12)
    x = x.view(3, 4, 96)
    expected = F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    assert torch.equal(linear(x, weight, bias), expected)
    assert torch.equal(linear(x, weight), F.linear(x.float(), weight.float()).bfloat16())


def test_single_row_stays_native(upcasts):
    x, weight, bias = _inputs(torch.bfloat16, rows=1)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(linear(x[0], weight), F.linear(x[0], weight))


def test_projection_uses_linear(upcasts):
    x, weight, bias = _inputs(torch.bfloat16, rows=5)
    projection = make_linear(96, 160, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        projection.weight.copy_(weight)
        projection.bias.copy_(bias)
        y = projection(x.view(1, 5, 96))
    assert y.shape == (1, 5, 160) and projection.weight.dtype == torch.bfloat16
    assert torch.equal(y[0], linear(x, weight, bias))


def test_float32_is_untouched(upcasts):
    x, weight, bias = _inputs(torch.float32, rows=7)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


def test_bfloat16_engine_same_tokens_either_way(stories260k, monkeypatch):
    """The upcast changes summation order only: greedy stories stay the same."""
    prompts = ["Once upon a time", "The cat went to the park.", "Tim saw a tree."]
    params = SamplingParams(max_tokens=24, temperature=0)
    token_ids = {}
    for upcast in (True, False):
        monkeypatch.setattr(engine.layers, "cpu_matmul_upcasts", lambda dtype, u=upcast: u)
        llm = LLM(str(stories260k), dtype="bfloat16", device="cpu", kv_cache_memory="4MiB")
        assert llm.dtype == torch.bfloat16
        token_ids[upcast] = [out.token_ids for out in llm.generate(prompts, params)]
    assert token_ids[True] == token_ids[False]
    assert all(len(ids) == 24 for ids in token_ids[True])
