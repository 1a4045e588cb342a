"""LLM(model=...) from an s3:// URI (moto, real HTTP) and from a hub name (huggingface_hub's
cache, offline): fetched once into a local folder, fetched again only when it changed, the
same tokens as the local folder; clear errors for what is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from engine import LLM, SamplingParams
from engine.fetch import local_model_dir

PROMPTS = [[5, 9, 13, 2], [7] * 12]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def upload_folder(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def tokens(model: str) -> list[list[int]]:
    llm = LLM(model, dtype="float32", kv_cache_memory="16MiB")
    return [out.token_ids for out in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("BATCHINFER_MODEL_CACHE", str(cache))
    return cache


def test_s3_model_is_fetched_once_and_again_when_it_changes(s3_server, tiny_llama, model_cache):
    prefix = f"models-{uuid.uuid4().hex[:8]}/tiny"
    upload_folder(tiny_llama, s3_server.bucket, prefix)
    # What published repositories also carry, and the engine does not read: not fetched.
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for extra in ("original/consolidated.00.pth", "original/params.json", "README.md",
                  "modeling_custom.py"):
        s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{extra}", Body=b"not needed")
    uri = f"s3://{s3_server.bucket}/{prefix}"

    assert tokens(uri) == tokens(str(tiny_llama))
    folder = local_model_dir(uri)
    assert folder.parent == model_cache
    local_files = sorted(p.name for p in tiny_llama.iterdir() if p.is_file())
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == local_files
    weights = folder / "model.safetensors"
    first_download = weights.stat().st_mtime_ns
    assert local_model_dir(uri) == folder
    assert weights.stat().st_mtime_ns == first_download, "an unchanged model was downloaded again"

    # The operator replaces the model's config in place: the next load sees the new one.
    config = json.loads((tiny_llama / "config.json").read_text())
    s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/config.json",
                  Body=json.dumps({**config, "max_position_embeddings": 256}).encode())
    assert local_model_dir(uri) == folder
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 256
    assert LLM(uri, dtype="float32", kv_cache_memory="16MiB").max_model_len == 256
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".")], "staging left"


def test_what_is_not_there_is_a_clear_error(s3_server, tiny_llama, model_cache, tmp_path):
    bucket = s3_server.bucket
    with pytest.raises(FileNotFoundError, match=r"no model files .* under s3://.*/nothing-here"):
        local_model_dir(f"s3://{bucket}/nothing-here")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=bucket, Key="not-a-model/readme.txt", Body=b"hello")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        local_model_dir(f"s3://{bucket}/not-a-model")
    with pytest.raises(ValueError, match=r"expected s3://bucket/prefix"):
        local_model_dir(f"s3://{bucket}")
    with pytest.raises(ValueError, match="unsupported model URI 'ftp://host/model'"):
        local_model_dir("ftp://host/model")
    with pytest.raises(FileNotFoundError, match="is not a local model folder"):
        LLM(str(tmp_path / "no-such-model"))


def test_hub_names_come_through_the_hub_cache(tiny_llama, tmp_path):
    """A repository id, or hf://id, resolves to its snapshot in huggingface_hub's cache;
    offline, a repository that is not cached is a clear error. In a fresh process: the
    hub's settings are read when huggingface_hub is imported."""
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in tiny_llama.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    probe = (
        "import sys\n"
        "from engine import LLM, SamplingParams\n"
        "from engine.fetch import local_model_dir\n"
        "print(local_model_dir('acme/tiny-llama'))\n"
        "print(local_model_dir('hf://acme/tiny-llama'))\n"
        "llm = LLM('acme/tiny-llama', dtype='float32', kv_cache_memory='16MiB')\n"
        "print(llm.generate([[5, 9, 13, 2]], SamplingParams(max_tokens=8, temperature=0.0,"
        " ignore_eos=True))[0].token_ids)\n"
        "try:\n"
        "    local_model_dir('acme/not-cached')\n"
        "except FileNotFoundError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found, found_by_uri, generated, missing = result.stdout.strip().splitlines()[-4:]
    assert Path(found) == Path(found_by_uri) == snapshot
    assert generated == str(tokens(str(tiny_llama))[0])
    assert "model 'acme/not-cached' is not a local folder, and fetching it from the Hugging " \
           "Face hub failed" in missing


def test_processes_fetching_the_same_model_at_once_download_it_once(s3_server, tiny_llama,
                                                                     model_cache):
    """Two workers on one machine (a worker per GPU) loading the same s3:// model together:
    one downloads, the other waits for the lock and finds the copy current."""
    prefix = f"models-{uuid.uuid4().hex[:8]}/tiny"
    upload_folder(tiny_llama, s3_server.bucket, prefix)
    uri = f"s3://{s3_server.bucket}/{prefix}"
    probe = "import sys; from engine.fetch import local_model_dir; print(local_model_dir(sys.argv[1]))"
    fetchers = [subprocess.Popen([sys.executable, "-c", probe, uri], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [fetcher.communicate(timeout=120) for fetcher in fetchers]
    assert all(fetcher.returncode == 0 for fetcher in fetchers), outputs
    [folder] = {out.strip() for out, _ in outputs}
    assert (Path(folder) / "model.safetensors").read_bytes() == (
        tiny_llama / "model.safetensors").read_bytes()
    weight_gets = [line for line in s3_server.log_path.read_text().splitlines()
                   if f'"GET /{s3_server.bucket}/{prefix}/model.safetensors' in line]
    assert len(weight_gets) == 1, weight_gets
