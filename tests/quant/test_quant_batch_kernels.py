"""The large-batch kernel paths: int8 activations (w8a8) and int4 dequantized tiles.

No timing asserts: the switches are forced with their environment variables, and the
start-up measurement's rule is checked on made-up outcomes.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from engine.kernels.row_passes import quantize_rows
from engine.quant import QuantLinear, crossover, int8_activations
from engine.quant.int4_tiles import Int4Tiles
from engine.quant.matmul import INT4_TILES_ENV_VAR
from tests.quant.engine_helpers import final_logits, make_llm
from tests.quant.gptq_packer import make_gptq

K, N = 512, 48
INT8 = int8_activations.ENV_VAR
PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 3], [1, 8, 8, 8, 4, 4, 4, 4, 6, 6, 6]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _from_gptq(fake, dtype=torch.bfloat16) -> QuantLinear:
    return QuantLinear.from_gptq(
        fake.qweight, fake.qzeros, fake.scales, fake.g_idx, None,
        bits=fake.bits, group_size=fake.group_size, v1_zero_offset=fake.v1,
        dtype=dtype, device="cpu",
    )  # fmt: skip


def _x(rows: int, k: int = K, seed: int = 1) -> torch.Tensor:
    """Random bfloat16 activations whose last row, where there are several, is all zero
    (padding), which must come out as zeros."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    if rows > 1:
        x[-1] = 0
    return x.bfloat16()


# --- int8 activations -----------------------------------------------------------------


def test_quantize_rows_round_trip_within_half_a_step():
    """x ~= q * scale per row, scale = absmax / 127: |error| <= scale / 2 per element."""
    x = torch.randn(9, 300, generator=torch.Generator().manual_seed(0))
    x *= torch.logspace(-3, 3, 9)[:, None]
    x[4] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (9, 1)
    assert int(q.abs().max()) == 127  # the absmax element lands on the last level
    error = (q.float() * scale - x).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-6))
    assert torch.all(q[4] == 0)


def _int8_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Worst case |w8a8 - x @ W.T| per output: each activation moves by at most
    absmax(row) / 254, times sum_k |W[n, k]|, plus bfloat16 rounding of the output
    (2**-8 of its size, generously)."""
    step = x.double().abs().amax(1, keepdim=True) / 254
    exact = x.double() @ weight.t()
    return step * weight.abs().sum(1)[None, :] + exact.abs() * 2**-8 + 1e-6, exact


@pytest.mark.parametrize(("group_size", "sym"), [(-1, True), (-1, False), (128, True),
                                                 (64, False)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_activations_within_rounding_bound(monkeypatch, group_size, sym, rows):
    fake = make_gptq(K, N, 8, group_size, act_order=True, sym=sym)
    monkeypatch.setenv(INT8, "on")
    w8a8 = _from_gptq(fake)
    assert w8a8.kernel.switch_rows == 0
    monkeypatch.setenv(INT8, "off")
    weight_only = _from_gptq(fake)
    assert weight_only.kernel.switch_rows == math.inf
    x = _x(rows)
    bound, exact = _int8_bound(x, fake.weight())
    y = w8a8(x).double()
    assert torch.all((y - exact).abs() <= bound)
    # The weight-only output is the exact product up to bfloat16 rounding (2**-8 of
    # the output's size at most), so the two differ by at most the bound plus that.
    slack = exact.abs() * 2**-8 + 1e-6
    assert torch.all((y - weight_only(x).double()).abs() <= bound + slack)
    assert rows == 1 or torch.all(y[-1] == 0)


def test_int8_activations_skip_shapes_int_mm_fails(monkeypatch):
    monkeypatch.setenv(INT8, "on")
    monkeypatch.setattr(int8_activations, "int_mm_works", lambda k, n: False)
    layer = QuantLinear.from_float(torch.randn(N, K), None, 8, -1, torch.bfloat16, "cpu")
    assert layer.kernel.switch_rows == math.inf


def test_int_mm_self_check_passes_here():
    """torch's int8 GEMM, on this machine, at a shape of the engine's and a ragged one."""
    assert int8_activations.int_mm_works(768, 2048)
    assert int8_activations.int_mm_works(172, 40)


def test_auto_int8_activations_only_with_int8_dot_instructions(monkeypatch):
    monkeypatch.setenv(INT8, "auto")
    monkeypatch.setattr(int8_activations, "cpu_has_int8_dot", lambda: False)
    layer = QuantLinear.from_float(torch.randn(N, K), None, 8, -1, torch.bfloat16, "cpu")
    assert layer.kernel.switch_rows == math.inf


def test_auto_int8_activations_measured_and_correct(monkeypatch):
    """Whatever the measurement picks on this machine, every row count is right."""
    monkeypatch.setenv(INT8, "auto")
    monkeypatch.setattr(int8_activations, "cpu_has_int8_dot", lambda: True)
    fake = make_gptq(K, N, 8, -1, sym=True)
    layer = _from_gptq(fake)
    assert layer.kernel.switch_rows in (*crossover.MEASURED_ROWS, math.inf)
    for rows in (1, 16, 300):
        x = _x(rows)
        bound, exact = _int8_bound(x, fake.weight())
        assert torch.all((layer(x).double() - exact).abs() <= bound)


def test_greedy_engine_runs_with_int8_activations(monkeypatch, make_model):
    """A whole engine on int8 activations: it runs, and its logits stay near the
    weight-only engine's (random weights, hidden 128; bound 0.3)."""
    llm = _near_the_old_kernels(monkeypatch, make_model, INT8, "int8")
    switches = {m.kernel.switch_rows for m in llm.model.modules() if isinstance(m, QuantLinear)}
    assert switches == {0}


def _near_the_old_kernels(monkeypatch, make_model, switch: str, quantization: str):
    """An engine with switch on, checked against one with it off: logits within 0.3 on
    every prompt, and greedy runs of the full length. Returns the engine with it on."""
    model = make_model("llama", hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setenv(switch, "on")
    llm = make_llm(model, dtype="bfloat16", quantization=quantization)
    monkeypatch.setenv(switch, "off")
    reference = make_llm(model, dtype="bfloat16", quantization=quantization)
    for ids in PROMPTS:
        assert float((final_logits(llm, ids) - final_logits(reference, ids)).abs().max()) < 0.3
    outs = llm.generate(PROMPTS, GREEDY)
    assert [len(o.token_ids) for o in outs] == [12, 12, 12]
    return llm


# --- int4 tiles -------------------------------------------------------------------------


@pytest.fixture
def centered(monkeypatch):
    """fake -> (the Centered form QuantLinear.from_gptq builds from it, that float32 layer)."""
    import engine.quant.linear as quant_linear

    seen = []
    real = quant_linear.pick_kernel
    monkeypatch.setattr(quant_linear, "pick_kernel",
                        lambda w, dtype, device: seen.append(w) or real(w, dtype, device))

    def build(fake):
        layer = _from_gptq(fake, torch.float32)
        return seen[-1], layer

    return build


# (K, N, group size, sym, act-order): N = 40 and 24 leave a ragged last tile of 16 rows.
INT4_SHAPES = [(512, 48, 128, False, False), (512, 48, 32, True, True),
               (256, 40, 64, False, False), (384, 24, -1, False, True),
               (96, 16, 32, True, False)]


@pytest.mark.parametrize(("k", "n", "group_size", "sym", "act_order"), INT4_SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_int4_tiles_match_definition_in_float32(monkeypatch, centered, k, n, group_size,
                                                 sym, act_order, rows):
    """In float32 the tiles compute the definition up to summation order, whatever the
    tiling: several tiles of 16 rows per call, the last one ragged where n % 16 != 0."""
    monkeypatch.setattr("engine.quant.int4_tiles._TILE_ELEMENTS", 16 * k)
    fake = make_gptq(k, n, 4, group_size, act_order=act_order, sym=sym)
    w, layer = centered(fake)
    tiles = Int4Tiles(w.qc, w.scales, w.offsets, w.group_size, torch.float32,
                      torch.device("cpu"))
    assert tiles.tile_rows == 16
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2))
    x_in_group_order = x if layer.perm is None else x.index_select(1, layer.perm)
    expected = x.double() @ fake.weight().t()
    got = tiles(x_in_group_order).double()
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize(("k", "n", "group_size", "sym", "act_order"),
                         [s for s in INT4_SHAPES if s[1] % 16 == 0])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_int4_tiles_match_tinygemm_in_bfloat16(monkeypatch, k, n, group_size, sym,
                                               act_order, rows):
    """The tiles and torch's packed kernel compute the same bfloat16 layer: both within
    bfloat16 rounding of scales and outputs (1e-2 of the largest output, as for every
    packed kernel) of the definition, and of each other."""
    monkeypatch.setattr("engine.quant.int4_tiles._TILE_ELEMENTS", 32 * k)  # ragged tiles
    fake = make_gptq(k, n, 4, group_size, act_order=act_order, sym=sym)
    monkeypatch.setenv(INT4_TILES_ENV_VAR, "on")
    tiles = _from_gptq(fake)
    monkeypatch.setenv(INT4_TILES_ENV_VAR, "off")
    tinygemm = _from_gptq(fake)
    assert (tiles.kernel_name, tinygemm.kernel_name) == ("int4_tiles", "int4_tinygemm")
    x = _x(rows, k)
    expected = x.double() @ fake.weight().t()
    scale = expected.abs().max()
    got, packed = tiles(x).double(), tinygemm(x).double()
    assert float((got - expected).abs().max() / scale) < 1e-2
    assert float((got - packed).abs().max() / scale) < 1e-2
    assert rows == 1 or torch.all(got[-1] == 0)


def test_int4_switches_kernels_at_the_measured_rows(monkeypatch):
    monkeypatch.setenv(INT4_TILES_ENV_VAR, "auto")
    monkeypatch.setattr(crossover, "crossover_rows", lambda *args: 16)
    fake = make_gptq(K, N, 4, 128, sym=False)
    layer = _from_gptq(fake)
    assert layer.kernel_name == "int4_tinygemm+tiles"
    for rows, kernel in ((15, layer.kernel.small), (16, layer.kernel.large)):
        x = _x(rows)
        assert torch.equal(layer.kernel(x), kernel(x))
    both = layer.kernel.small.nbytes() + layer.kernel.large.nbytes()
    assert layer.weight_bytes() == both


def test_auto_int4_measured_and_correct(monkeypatch):
    """Whatever the measurement picks on this machine, every row count is right."""
    monkeypatch.setenv(INT4_TILES_ENV_VAR, "auto")
    fake = make_gptq(K, N, 4, 64, sym=False)
    layer = _from_gptq(fake)
    assert layer.kernel_name in ("int4_tinygemm", "int4_tiles", "int4_tinygemm+tiles")
    for rows in (1, 16, 300):
        x = _x(rows)
        expected = x.double() @ fake.weight().t()
        assert float((layer(x).double() - expected).abs().max() / expected.abs().max()) < 1e-2


def test_greedy_engine_runs_with_int4_tiles(monkeypatch, make_model):
    llm = _near_the_old_kernels(monkeypatch, make_model, INT4_TILES_ENV_VAR, "int4")
    kernels = {m.kernel_name for m in llm.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"int4_tiles"}


def test_greedy_engine_runs_with_int4_tiles_in_int8(monkeypatch, make_model):
    monkeypatch.setenv(INT8, "on")
    llm = _near_the_old_kernels(monkeypatch, make_model, INT4_TILES_ENV_VAR, "int4")
    kernels = {m.kernel_name for m in llm.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"int4_tiles_w8a8"}


# --- the switch rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("large_wins", "rows"),
    [([False] * 7, math.inf), ([True] * 7, 1),
     ([False, False, True, False, True, True, True], 64),  # a lone early win is ignored
     ([False] * 6 + [True], 256)],
)
def test_crossover_is_the_start_of_the_last_winning_run(monkeypatch, large_wins, rows):
    outcomes = iter(large_wins)
    monkeypatch.setattr(crossover, "_fastest_seconds",
                        lambda kernels, x: (1.0, 0.5) if next(outcomes) else (0.5, 1.0))
    key = ("test", tuple(large_wins))
    assert crossover.crossover_rows(key, None, None, 8, torch.float32, torch.device("cpu")) == rows
    # Cached: a second layer of the shape measures nothing (the outcomes are used up).
    assert crossover.crossover_rows(key, None, None, 8, torch.float32, torch.device("cpu")) == rows


def test_bad_switch_setting_rejected(monkeypatch):
    monkeypatch.setenv(INT8, "sometimes")
    with pytest.raises(ValueError, match="BATCHINFER_INT8_ACTIVATIONS='sometimes'"):
        QuantLinear.from_float(torch.randn(N, K), None, 8, -1, torch.bfloat16, "cpu")


@pytest.mark.parametrize(("k", "n", "group_size", "sym", "act_order"), INT4_SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_int4_tiles_in_int8_within_requantization_bound(monkeypatch, centered, k, n,
                                                        group_size, sym, act_order, rows):
    """With int8 activations the tiles compute the bfloat16 int4 layer (bfloat16 scales
    and offsets, as tinygemm) up to two roundings: each activation by at most its row's
    absmax / 254, each weight by half its row's int8 step max |W[o]| / 127 (ragged tiles
    of 16 rows)."""
    monkeypatch.setattr("engine.quant.int4_tiles._INT8_TILE_ELEMENTS", 16 * k)
    monkeypatch.setenv(INT8, "on")
    fake = make_gptq(k, n, 4, group_size, act_order=act_order, sym=sym)
    w, layer = centered(fake)
    tiles = Int4Tiles(w.qc, w.scales, w.offsets, w.group_size, torch.bfloat16,
                      torch.device("cpu"))
    assert (tiles.name, tiles.tile_rows) == ("int4_tiles_w8a8", 16)
    weight = w.qc.double().view(n, -1, w.group_size) * tiles.scales.double()
    if tiles.row_offsets is not None:
        weight += tiles.row_offsets.double()
    weight = weight.view(n, k)
    x = _x(rows, k)
    x_in_group_order = x if layer.perm is None else x.index_select(1, layer.perm)
    bound, exact = _int8_bound(x_in_group_order, weight)
    weight_step = weight.abs().amax(1) / 127
    bound += (x_in_group_order.double().abs() * (1 + 1 / 254)).sum(1, keepdim=True) * weight_step / 2
    got = tiles(x_in_group_order).double()
    assert torch.all((got - exact).abs() <= bound)
    # and far tighter than the bound in practice: the layer is the int4 layer
    assert float((got - exact).abs().max() / exact.abs().max()) < 2e-2
    assert rows == 1 or torch.all(got[-1] == 0)
