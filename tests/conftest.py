"""Shared fixtures: real Redis and S3 servers, small models built on the spot, shared models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.random_model import make_tiny_model
from tests.servers import MotoS3Server, RedisServer, log_tail

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO_ROOT.parent / "shared" / "models"

# Two cores are shared by the test process and the worker processes it starts.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors
# (tests/engine/test_engine_attention.py); it must be chosen before Triton is imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must never reach the machine's own Redis or a real cloud.
for _var in ("BATCHINFER_BROKER_URL", "BATCHINFER_STORE_URL", "AWS_PROFILE"):
    os.environ.pop(_var, None)


def _shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"shared model {path} is not present on this machine")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The models in tests are small and the machine has 2 shared cores: a second torch
    thread only adds contention (one busy core can make a step 100x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The real trained tiny Llama beside the project (skips where absent)."""
    return _shared_model("stories260K")


@pytest.fixture(scope="session")
def gptq_int4_model() -> Path:
    """A GPTQ int4 checkpoint written by GPTQModel; its float32 twin is `<path>-fp32`."""
    return _shared_model("gptq-llama-int4-g64")


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """Factory: make_model(arch="llama", shape="tiny", seed=0, **config_overrides) -> Path.

    Random-weight Hugging Face folders, built once per distinct argument set.
    """
    built: dict[str, Path] = {}

    def build(arch: str = "llama", shape: str = "tiny", seed: int = 0, **overrides) -> Path:
        key = repr((arch, shape, seed, sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"model-{arch}-{shape}")
            built[key] = make_tiny_model(out, arch=arch, shape=shape, seed=seed, **overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(make_model) -> Path:
    return make_model("llama")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, persistence off."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[MotoS3Server]:
    """The moto S3 server (real HTTP) on a free loopback port, with a bucket."""
    server = MotoS3Server(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in _AWS_TEST_ENV}
    os.environ.update(_AWS_TEST_ENV, AWS_ENDPOINT_URL=server.endpoint_url)
    server.start()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)


_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_store_url(s3_server) -> str:
    """A fresh prefix in the test bucket for each test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def file_store_url(tmp_path) -> str:
    return f"file://{tmp_path / 'store'}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the server logs to a failing test's report."""
    report = yield
    if report.failed:
        for name in ("redis_server", "s3_server"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if server is not None:
                report.sections.append((f"{server.name} log", log_tail(server.log_path)))
    return report
