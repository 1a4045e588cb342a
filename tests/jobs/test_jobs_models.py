"""Resolving model names: the registry, local folders, and the allowed model roots."""

from __future__ import annotations

import json

import pytest

from jobs.errors import UserError
from jobs.models import resolve_model


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Two model folders under an allowed root, one outside it, and a registry."""
    monkeypatch.delenv("BATCHINFER_MODELS", raising=False)
    monkeypatch.delenv("BATCHINFER_MODEL_ROOTS", raising=False)
    root = tmp_path / "models"
    for folder in (root / "llama", root / "qwen", tmp_path / "elsewhere" / "m"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    registry = tmp_path / "registry" / "models.json"
    registry.parent.mkdir()
    registry.write_text(json.dumps({"llama-7b": str(root / "llama"), "qwen": "../models/qwen",
                                    "remote": "s3://bucket/models/x", "stray": "../elsewhere/m",
                                    "hub": "hf://acme/m", "ftp": "ftp://host/m"}))
    return tmp_path


def test_local_folders_without_registry_or_roots(models):
    assert resolve_model(str(models / "models" / "llama")) == str(models / "models" / "llama")
    assert resolve_model(str(models / "elsewhere" / "m")) == str(models / "elsewhere" / "m")


def test_registry_names_resolve_through_it(models, monkeypatch):
    monkeypatch.setenv("BATCHINFER_MODELS", str(models / "registry" / "models.json"))
    assert resolve_model("llama-7b") == str(models / "models" / "llama")
    assert resolve_model("qwen") == str(models / "models" / "qwen")  # relative to the registry
    assert resolve_model("remote") == "s3://bucket/models/x"
    assert resolve_model("hub") == "hf://acme/m"
    with pytest.raises(UserError, match=r"'ftp' is registered as 'ftp://host/m': "
                                        r"BATCHINFER_MODELS takes local paths and s3:// or hf://"):
        resolve_model("ftp")
    assert resolve_model(str(models / "models" / "llama")) == str(models / "models" / "llama")
    with pytest.raises(UserError, match=r"unknown model 'gpt-9': not a registered name "
                                        r"\(registered: ftp, hub, llama-7b, qwen, remote, stray\)"):
        resolve_model("gpt-9")
    with pytest.raises(UserError, match="a URI must be registered"):
        resolve_model("s3://bucket/other")


def test_roots_confine_local_paths_after_resolving_symlinks(models, monkeypatch):
    monkeypatch.setenv("BATCHINFER_MODEL_ROOTS", f"/nonexistent:{models / 'models'}")
    monkeypatch.setenv("BATCHINFER_MODELS", str(models / "registry" / "models.json"))
    assert resolve_model(str(models / "models" / "qwen")) == str(models / "models" / "qwen")
    assert resolve_model("llama-7b") == str(models / "models" / "llama")
    with pytest.raises(UserError, match="outside the allowed model folders"):
        resolve_model(str(models / "elsewhere" / "m"))
    with pytest.raises(UserError, match="outside the allowed model folders"):
        resolve_model("stray")  # registered, but outside the roots
    with pytest.raises(UserError, match="outside the allowed model folders"):
        resolve_model(str(models / "models" / ".." / "elsewhere" / "m"))
    (models / "models" / "link").symlink_to(models / "elsewhere" / "m")
    with pytest.raises(UserError, match="outside the allowed model folders"):
        resolve_model(str(models / "models" / "link"))


def test_unknown_models_are_user_errors(models):
    with pytest.raises(UserError, match="unknown model .*no-such-model.*not a local model folder"):
        resolve_model(str(models / "no-such-model"))
    with pytest.raises(UserError, match="unknown model"):
        resolve_model(str(models))  # a folder, but no config.json
    with pytest.raises(UserError, match="no model given"):
        resolve_model("")


def test_a_broken_registry_is_reported(models, monkeypatch):
    bad = models / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("BATCHINFER_MODELS", str(bad))
    with pytest.raises(UserError, match="BATCHINFER_MODELS: .*not valid JSON"):
        resolve_model("x")
    bad.write_text('["a list"]')
    with pytest.raises(UserError, match="must be a JSON object"):
        resolve_model("x")
    monkeypatch.setenv("BATCHINFER_MODELS", str(models / "missing.json"))
    with pytest.raises(UserError, match="BATCHINFER_MODELS: cannot read"):
        resolve_model("x")
