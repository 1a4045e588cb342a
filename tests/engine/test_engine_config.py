"""Reading model configs, RoPE frequencies, and device / dtype / memory settings."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.config import load_model_config, model_config_from_dict
from engine.device import parse_memory_size, resolve_device, resolve_dtype
from engine.rope import rope_frequencies

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 256, "eos_token_id": 2,
}


def test_defaults_and_derived_fields():
    config = model_config_from_dict(BASE)
    assert config.num_kv_heads == 4 and config.head_dim == 16
    assert config.rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.sliding_windows == (None, None)
    assert not config.attention_bias and not config.qk_norm and not config.tie_word_embeddings
    assert config.eos_token_ids == (2,)


def test_architecture_specific_fields():
    qwen2 = model_config_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.output_bias  # Qwen2 always has q/k/v bias
    llama_bias = model_config_from_dict({**BASE, "attention_bias": True})
    assert llama_bias.attention_bias and llama_bias.output_bias
    qwen3 = model_config_from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm and qwen3.head_dim == 32
    mistral = model_config_from_dict(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 32}
    )
    assert mistral.sliding_windows == (32, 32)
    # A window at least as long as the context masks nothing.
    wide = model_config_from_dict(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    )
    assert wide.sliding_windows == (None, None)
    qwen_window = model_config_from_dict({
        **BASE, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
        "sliding_window": 32, "max_window_layers": 1,
    })
    assert qwen_window.sliding_windows == (None, 32)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_config_from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})


def test_old_style_rope_scaling_is_normalised():
    config = model_config_from_dict({
        **BASE, "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0},
    })
    assert config.rope == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    }
    with pytest.raises(ValueError, match="longrope"):
        model_config_from_dict({**BASE, "rope_scaling": {"rope_type": "longrope"}})


def test_generation_config_eos_ids_are_added(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model_config(tmp_path).eos_token_ids == (2, 7)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
         "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
    ids=["linear", "llama3", "yarn", "yarn-mscale"],
)
def test_rope_frequencies_equal_transformers(rope):
    rope = {"rope_theta": 10000.0, **rope}
    hf_config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
        rope_parameters=dict(rope),
    )
    expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    ours, scaling = rope_frequencies(16, rope, 512)
    assert torch.equal(ours, expected)
    assert scaling == pytest.approx(expected_scaling, abs=0)
    default, _ = rope_frequencies(16, {"rope_type": "default", "rope_theta": 10000.0}, 512)
    assert not torch.equal(ours, default)


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_dtype("half", cpu) == torch.float16
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_memory_sizes():
    assert parse_memory_size(1234) == 1234
    assert parse_memory_size("4GiB") == 4 * 2**30
    assert parse_memory_size("512 MiB") == 512 * 2**20
    assert parse_memory_size("1.5GB") == 1_500_000_000
    for bad in ("lots", "-1GiB", 0, "4 parsecs"):
        with pytest.raises(ValueError):
            parse_memory_size(bad)
