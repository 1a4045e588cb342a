"""EngineConfig: LLM's keyword arguments in one validated place, resolved on LLM.engine_config."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch

from engine import LLM, EngineConfig
from engine.model_runner import kv_cache_bytes_per_block


def test_llm_takes_exactly_the_engine_configs_fields_and_defaults():
    parameters = list(inspect.signature(LLM).parameters.values())
    fields = dataclasses.fields(EngineConfig)
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert [p.default for p in parameters[1:]] == [f.default for f in fields[1:]]
    assert parameters[0].default is inspect.Parameter.empty  # the model is required


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block_size": 0}, "block_size must be a positive int, got 0"),
        ({"max_num_seqs": 2.5}, "max_num_seqs must be a positive int, got 2.5"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens must be a positive int"),
        ({"max_model_len": 0}, "max_model_len must be a positive int, got 0"),
        ({"kv_cache_memory": "lots"}, "invalid memory size 'lots'"),
    ],
)
def test_settings_no_model_could_use_are_refused_before_loading(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="/nonexistent", **settings)
    with pytest.raises(ValueError, match=message):  # before looking for the model
        LLM("/nonexistent", **settings)


def test_engine_config_holds_the_resolved_settings(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB",
              max_num_seqs=8, seed=3)
    config = llm.engine_config
    assert config.model == str(tiny_llama)
    assert (config.device, config.dtype) == (torch.device("cpu"), torch.float32)
    assert (config.max_num_seqs, config.seed, config.quantization) == (8, 3, None)
    assert config.max_model_len == llm.config.max_position_embeddings
    block_bytes = kv_cache_bytes_per_block(llm.model, config.block_size, config.dtype)
    assert config.kv_cache_memory == llm.block_manager.num_blocks * block_bytes
    assert (llm.device, llm.dtype, llm.max_model_len) == (
        config.device, config.dtype, config.max_model_len
    )
    # The resolved settings describe the same engine again.
    again = LLM(**vars(config))
    assert again.engine_config == config


def test_quantization_resolves_to_the_schemes_canonical_name(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB",
              quantization=" INT4-G32 ")
    assert llm.engine_config.quantization == llm.quantization == "int4-g32"


def test_engine_s3_and_the_public_names_import_without_torch_until_used():
    code = (
        "import sys, engine, engine.s3; assert 'torch' not in sys.modules; "
        "from engine import SamplingParams; assert 'torch' not in sys.modules; "
        "from engine import LLM; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
