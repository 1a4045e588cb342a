"""GPTQ checkpoint reading: config, unpacking against an independent packer, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from engine.quant import QuantConfig, parse_quant_config, read_quant_config
from engine.quant.gptq import unpack_cols, unpack_gptq, unpack_rows
from tests.quant.gptq_packer import dequantize, make_gptq, pack_along_cols, pack_along_rows

K, N = 256, 64


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_words_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (64, 32))
    assert torch.equal(unpack_rows(pack_along_rows(codes, bits), bits), codes.int())
    assert torch.equal(unpack_cols(pack_along_cols(codes, bits), bits), codes.int())


def test_unpack_reads_low_bits_first():
    # Word 0x76543210 holds codes 0..7, code 0 in the lowest nibble.
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_rows(word, 4).flatten().tolist() == list(range(8))
    assert unpack_cols(word, 4).flatten().tolist() == list(range(8))


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_unpack_gptq_recovers_codes_and_weight(bits, group_size, act_order, v1):
    fake = make_gptq(K, N, bits, group_size, act_order=act_order, sym=False, v1=v1)
    got = unpack_gptq(
        fake.qweight, fake.qzeros, fake.scales, fake.g_idx, bits, group_size, v1_zero_offset=v1
    )
    assert torch.equal(got.q, fake.q.int())
    assert torch.equal(got.zeros, fake.zeros.int())
    assert torch.equal(got.g_idx, fake.g_idx.long())
    torch.testing.assert_close(dequantize(got).double(), fake.weight(), rtol=1e-6, atol=1e-7)


def test_missing_g_idx_means_consecutive_groups():
    fake = make_gptq(K, N, 4, 64)
    got = unpack_gptq(fake.qweight, fake.qzeros, fake.scales, None, 4, 64, v1_zero_offset=True)
    assert torch.equal(got.g_idx, torch.arange(K) // 64)


def test_v1_zero_point_of_zero_wraps_like_the_reference_kernels():
    # v1 writes zero point 0 as -1; masked to 4 bits that is 15, plus one: 16.
    fake = make_gptq(K, N, 4, 64)
    qzeros = pack_along_cols(torch.full((K // 64, N), -1), 4)
    got = unpack_gptq(fake.qweight, qzeros, fake.scales, None, 4, 64, v1_zero_offset=True)
    assert torch.all(got.zeros == 16)


def _fake_args():
    fake = make_gptq(K, N, 4, 64)
    return dict(qweight=fake.qweight, qzeros=fake.qzeros, scales=fake.scales, g_idx=fake.g_idx)


@pytest.mark.parametrize("missing", ["qweight", "qzeros", "scales"])
def test_missing_tensor_is_named(missing):
    args = _fake_args() | {missing: None}
    with pytest.raises(ValueError, match=rf"layers\.0\.mlp\.up_proj\.{missing} is missing"):
        unpack_gptq(**args, bits=4, group_size=64, v1_zero_offset=True, name="layers.0.mlp.up_proj")


def test_unsupported_bits_rejected():
    with pytest.raises(ValueError, match=r"bits=3 is not supported"):
        unpack_gptq(**_fake_args(), bits=3, group_size=64, v1_zero_offset=True)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match=r"up: group_size=48 does not divide in_features=256"):
        unpack_gptq(**_fake_args(), bits=4, group_size=48, v1_zero_offset=True, name="up")


@pytest.mark.parametrize(
    ("tensor", "bad"),
    [
        ("scales", torch.zeros(3, N, dtype=torch.float16)),
        ("qzeros", torch.zeros(K // 64, N, dtype=torch.int32)),
        ("g_idx", torch.zeros(K + 1, dtype=torch.int32)),
    ],
)
def test_shape_mismatch_is_named(tensor, bad):
    args = _fake_args() | {tensor: bad}
    with pytest.raises(ValueError, match=rf"down\.{tensor}: shape .* does not match"):
        unpack_gptq(**args, bits=4, group_size=64, v1_zero_offset=True, name="down")


def test_g_idx_out_of_range_rejected():
    args = _fake_args()
    args["g_idx"] = args["g_idx"] + 1
    with pytest.raises(ValueError, match=r"g_idx: values must lie in \[0, 4\)"):
        unpack_gptq(**args, bits=4, group_size=64, v1_zero_offset=True)


def _write_config(tmp_path, quantization_config, file="config.json"):
    body = {"model_type": "llama"}
    if file == "config.json":
        body["quantization_config"] = quantization_config
    else:
        body = quantization_config
    (tmp_path / file).write_text(json.dumps(body))
    return tmp_path


def test_read_quant_config_from_config_json(tmp_path):
    raw = {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": True,
           "sym": False, "checkpoint_format": "gptq_v2"}  # fmt: skip
    config = read_quant_config(_write_config(tmp_path, raw))
    assert config == QuantConfig(8, 128, True, False, "gptq_v2")
    assert not config.v1_zero_offset


def test_read_quant_config_from_legacy_quantize_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raw = {"bits": 4, "group_size": -1, "desc_act": False, "sym": True}
    config = read_quant_config(_write_config(tmp_path, raw, file="quantize_config.json"))
    assert config == QuantConfig(4, -1, False, True, "gptq")
    assert config.v1_zero_offset


def test_read_quant_config_none_for_unquantized_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_quant_config(tmp_path) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bits": 3, "group_size": 128}, r"bits=3 is not supported"),
        ({"bits": 4, "group_size": 0}, r"group_size=0 must be -1 or a positive int"),
        ({"bits": 4, "quant_method": "awq"}, r"quant_method 'awq' is not supported"),
        ({"bits": 4, "checkpoint_format": "marlin"}, r"checkpoint format 'marlin'"),
        ({"bits": 4, "format": "gptq", "checkpoint_format": "gptq_v2"}, r"contradicts"),
    ],
)
def test_bad_quant_config_rejected(tmp_path, raw, message):
    with pytest.raises(ValueError, match=message):
        read_quant_config(_write_config(tmp_path, raw))


def test_parse_quant_config_names_its_source():
    with pytest.raises(ValueError, match=r"^my/config.json: bits=3"):
        parse_quant_config({"bits": 3}, source="my/config.json")
