"""Whole-model GPTQ loading over layouts the shared fixture does not have.

tests/quant/gptq_packer.py writes GPTQ checkpoints of small random models with codes it
chooses (8 bits, act-order, asymmetric, v2 zeros, biases), plus a float twin holding the
weights those codes define. The engine on the checkpoint must compute what the float
engine computes on the twin: float32 activations to summation order (1e-4 on logits of a
few units; measured <= 5e-6), bfloat16 (packed kernels) to bfloat16 rounding (0.15; the
unquantized engine alone moves by up to 0.065 on these models in bfloat16).
"""

from __future__ import annotations

import pytest

from engine.quant import QuantLinear
from scripts.quality import teacher_forced_logits
from tests.quant.engine_helpers import make_llm
from tests.quant.gptq_packer import write_gptq_model

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2)
PROMPTS = ["the cat saw a big red ball", "once upon a time", "dog"]


@pytest.mark.parametrize(
    ("arch", "bits", "group_size", "act_order", "sym", "v1", "name"),
    [
        ("llama", 4, 128, False, True, True, "gptq-int4-g128"),
        ("llama", 4, 32, True, False, True, "gptq-int4-g32"),
        ("llama", 4, -1, False, False, False, "gptq-int4"),
        ("llama", 8, 64, True, False, False, "gptq-int8-g64"),
        ("llama", 8, -1, False, True, True, "gptq-int8"),
        ("qwen2", 4, 64, True, True, True, "gptq-int4-g64"),  # q/k/v biases
        ("qwen2", 8, 128, False, False, True, "gptq-int8-g128"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gptq_engine_is_the_float_engine_on_dequantized_weights(
    make_model, tmp_path, arch, bits, group_size, act_order, sym, v1, name, dtype
):
    gptq_dir, dequant_dir = write_gptq_model(
        make_model(arch, **SHAPE), tmp_path, bits, group_size, act_order=act_order, sym=sym,
        v1=v1,
    )
    llm = make_llm(gptq_dir, dtype=dtype)
    assert llm.quantization == name
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * llm.config.num_layers
    assert all((m.perm is not None) == (act_order and group_size != -1) for m in layers)
    reference = make_llm(dequant_dir)
    bound = 1e-4 if dtype == "float32" else 0.15
    for prompt in PROMPTS:
        ids = llm.tokenizer(prompt)["input_ids"]
        got, expected = teacher_forced_logits(llm, ids), teacher_forced_logits(reference, ids)
        assert float((got - expected).abs().max()) < bound
