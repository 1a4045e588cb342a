"""A worker's engine settings come from its environment (README: Configuration)."""

from __future__ import annotations

import pytest

from workers.engine_cache import engine_options


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


def test_a_bad_flag_is_refused_with_its_value(monkeypatch):
    monkeypatch.setenv("BATCHINFER_ENFORCE_EAGER", "maybe")
    with pytest.raises(ValueError, match="'maybe'"):
        engine_options()
