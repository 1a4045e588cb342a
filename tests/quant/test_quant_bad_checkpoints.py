"""Broken GPTQ checkpoints through LLM(...): one clear ValueError naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.quant import QuantLinear
from tests.quant.engine_helpers import make_llm
from tests.quant.gptq_packer import write_gptq_model

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def gptq_model(make_model, tmp_path_factory) -> Path:
    """A valid int4 group-64 GPTQ checkpoint of a small random llama."""
    out = tmp_path_factory.mktemp("gptq")
    return write_gptq_model(make_model("llama", **SHAPE), out, 4, 64)[0]


def broken_copy(source: Path, out: Path, *, drop=(), add=None, rename=None,
                quantization_config=None) -> Path:
    """source with tensors dropped / added / renamed, or its quantization_config edited."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("reference.json"))
    tensors = load_file(source / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if quantization_config is not None:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] |= quantization_config
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_missing_scales_in_the_real_checkpoint(gptq_int4_model, tmp_path):
    folder = broken_copy(gptq_int4_model, tmp_path / "m",
                         drop={"model.layers.2.mlp.down_proj.scales"})
    with pytest.raises(ValueError,
                       match=r"^model\.layers\.2\.mlp\.down_proj\.scales is missing from the "
                             r"checkpoint$"):
        make_llm(folder)


def test_bits_3_in_the_real_checkpoint_config(gptq_int4_model, tmp_path):
    folder = broken_copy(gptq_int4_model, tmp_path / "m", quantization_config={"bits": 3})
    with pytest.raises(ValueError, match=r"config\.json: quantization_config: bits=3 is not "
                                         r"supported \(expected 4 or 8\)"):
        make_llm(folder)


def test_group_size_not_dividing_in_the_real_checkpoint(gptq_int4_model, tmp_path):
    folder = broken_copy(gptq_int4_model, tmp_path / "m", quantization_config={"group_size": 48})
    with pytest.raises(ValueError, match=r"^model\.layers\.\d\.(mlp|self_attn)\.\w+_proj: "
                                         r"group_size=48 does not divide in_features=\d+$"):
        make_llm(folder)


def _q_proj(layer: int = 0) -> str:
    return f"model.layers.{layer}.self_attn.q_proj"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(drop={f"{_q_proj(1)}.qweight"}),
         rf"^{_q_proj(1)}\.qweight is missing from the checkpoint$"),
        (dict(drop={f"{_q_proj()}.qzeros"}), rf"^{_q_proj()}\.qzeros is missing"),
        (dict(drop={f"{_q_proj(1)}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")}),
         rf"lacks weights: {_q_proj(1)}\.qweight$"),
        (dict(drop={"model.norm.weight"}), r"lacks weights: model\.norm\.weight$"),
        (dict(quantization_config={"group_size": 128}),
         r"_proj\.qzeros: shape \((2|4), 16\) does not match \((1|2), 16\) \(bits=4, "
         r"group_size=128, in_features=(128|256), out_features=(128|256)\)"),
        (dict(quantization_config={"bits": 8}),
         r"weight 'model\.layers\.0\.\w+\.\w+_proj\.qweight' has shape \((16|32), \d+\), "
         r"the config implies \((32|64), \d+\) at bits=8 \(4 codes per int32 word\)"),
        (dict(quantization_config={"lm_head": True}),
         r"a quantized lm_head \(lm_head: true\) is not supported"),
        (dict(quantization_config={"checkpoint_format": "marlin", "format": None}),
         r"checkpoint format 'marlin' is not supported"),
        (dict(quantization_config={"dynamic": {r"+:.*down_proj": {"bits": 8}}}),
         r"per-module overrides in 'dynamic' are not supported"),
        (dict(rename={f"{_q_proj()}.{p}": f"model.layers.0.self_attn.qq_proj.{p}"
                      for p in ("qweight", "qzeros", "scales", "g_idx")}),
         r"unexpected weight 'model\.layers\.0\.self_attn\.qq_proj\.\w+' in checkpoint"),
        (dict(add={f"{_q_proj()}.bias": torch.zeros(128)}),
         rf"unexpected weight '{_q_proj()}\.bias'"),
        (dict(add={f"{_q_proj()}.weight": torch.zeros(128, 128)}),
         rf"{_q_proj()}: the checkpoint has both a float weight and GPTQ tensors"),
        (dict(add={f"{_q_proj()}.extra": torch.zeros(1)}),
         rf"unexpected weight '{_q_proj()}\.extra' in checkpoint"),
    ],
    ids=["no-qweight", "no-qzeros", "no-projection", "no-norm", "wrong-group-size",
         "wrong-bits", "lm-head", "format", "dynamic", "renamed", "bias", "float-and-gptq",
         "extra-part"],
)
def test_broken_checkpoint_rejected(gptq_model, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        make_llm(broken_copy(gptq_model, tmp_path / "m", **change))


def test_projection_shape_against_config(gptq_model, tmp_path):
    """q_proj's tensors swapped with gate_proj's (256 outputs where the config says 128)."""
    q, gate = _q_proj(), "model.layers.0.mlp.gate_proj"
    parts = ("qweight", "qzeros", "scales", "g_idx")
    rename = {f"{q}.{p}": f"tmp.{p}" for p in parts} | {f"{gate}.{p}": f"{q}.{p}" for p in parts}
    folder = broken_copy(gptq_model, tmp_path / "m", rename=rename)
    tensors = load_file(folder / "model.safetensors")
    for p in parts:
        tensors[f"{gate}.{p}"] = tensors.pop(f"tmp.{p}")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weight 'model\.layers\.0\.\w+\.(q|gate)_proj\.qweight' "
                                         r"has shape \(16, (256|128)\), the config implies "
                                         r"\(16, (128|256)\) at bits=4"):
        make_llm(folder)


def test_gptq_projection_left_in_float_loads_as_float(gptq_model, tmp_path):
    """GPTQModel's dynamic "-:" exclusions leave a projection's float weight in place."""
    q = _q_proj()
    weight = torch.randn(128, 128) * 0.05
    folder = broken_copy(
        gptq_model, tmp_path / "m",
        drop={f"{q}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")},
        add={f"{q}.weight": weight},
        quantization_config={"dynamic": {r"-:.*layers\.0\.self_attn\.q_proj": {}}},
    )  # fmt: skip
    llm = make_llm(folder)
    layer = llm.model.get_submodule(q)
    assert not isinstance(layer, QuantLinear)
    assert torch.equal(layer.weight, weight)
    assert isinstance(llm.model.get_submodule("model.layers.0.self_attn.k_proj"), QuantLinear)
    assert llm.generate(["the cat"])[0].finish_reason in ("length", "stop")
