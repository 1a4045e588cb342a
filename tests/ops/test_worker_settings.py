"""A worker's engine settings come from its environment (README: Configuration)."""

from __future__ import annotations

import dataclasses

import pytest

from engine import LLM, EngineConfig
from jobs.errors import UserError
from workers.engine_cache import engine_options, options_for
from workers.launcher import celery_worker_argv, worker_shards


def test_engine_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("BATCHINFER_DTYPE", "bfloat16")
    monkeypatch.setenv("BATCHINFER_MAX_NUM_SEQS", "64")
    monkeypatch.setenv("BATCHINFER_ENFORCE_EAGER", " Yes ")
    monkeypatch.delenv("BATCHINFER_DEVICE", raising=False)
    options = engine_options()
    assert options["dtype"] == "bfloat16"
    assert options["max_num_seqs"] == 64
    assert options["enforce_eager"] is True
    assert "device" not in options  # unset: the engine's own default
    monkeypatch.setenv("BATCHINFER_ENFORCE_EAGER", "0")
    assert engine_options()["enforce_eager"] is False


def test_the_variables_are_the_engine_settings_a_worker_may_choose(monkeypatch):
    """BATCHINFER_<FIELD> for EngineConfig's fields, less those every worker must share."""
    for field in dataclasses.fields(EngineConfig):
        monkeypatch.setenv(f"BATCHINFER_{field.name.upper()}", "1")
    assert sorted(engine_options()) == [
        "device", "dtype", "enforce_eager", "kv_cache_memory", "max_num_batched_tokens",
        "max_num_seqs", "quantization",
    ]
    assert engine_options()["kv_cache_memory"] == "1"  # sizes and names: the engine parses


def test_a_bad_flag_is_refused_with_its_value(monkeypatch):
    monkeypatch.setenv("BATCHINFER_ENFORCE_EAGER", "maybe")
    with pytest.raises(ValueError, match="'maybe'"):
        engine_options()


def test_load_time_quantization_is_for_float_checkpoints(monkeypatch, gptq_int4_model):
    """A worker set to quantize at load time serves GPTQ checkpoints as they are."""
    float_twin = gptq_int4_model.with_name(gptq_int4_model.name + "-fp32")
    monkeypatch.setenv("BATCHINFER_QUANTIZATION", "int8")
    assert LLM(str(gptq_int4_model), **options_for(str(gptq_int4_model))).quantization == \
        "gptq-int4-g64"
    assert LLM(str(float_twin), **options_for(str(float_twin))).quantization == "int8"
    # A GPTQ requirement is not a load-time scheme: a checkpoint that differs still fails.
    monkeypatch.setenv("BATCHINFER_QUANTIZATION", "gptq-int8")
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        LLM(str(gptq_int4_model), **options_for(str(gptq_int4_model)))


def test_shards_a_worker_runs_at_once():
    """BATCHINFER_WORKER_SHARDS threads of a threads pool (default 2 on a GPU, 1 on a CPU)."""
    def pool(environ: dict, gpu: bool = False) -> list[str]:
        argv = celery_worker_argv("--queues", "q", environ=environ, gpu=gpu)
        assert argv[-2:] == ["--queues", "q"]
        return argv[argv.index("--pool") + 1:argv.index("--concurrency") + 2]

    assert pool({}) == ["threads", "--concurrency", "1"]
    assert pool({}, gpu=True) == ["threads", "--concurrency", "2"]
    assert pool({"BATCHINFER_WORKER_SHARDS": "1"}, gpu=True) == ["threads", "--concurrency", "1"]
    assert pool({"BATCHINFER_WORKER_SHARDS": "3"}) == ["threads", "--concurrency", "3"]
    for bad in ("0", "1.5", "two"):
        with pytest.raises(UserError, match="BATCHINFER_WORKER_SHARDS"):
            worker_shards({"BATCHINFER_WORKER_SHARDS": bad})
