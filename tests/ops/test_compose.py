"""The compose deployment is well-formed: `docker compose config` accepts it where the docker
client has the compose plugin; everywhere, PyYAML reads it and the checks below hold."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO_ROOT / "compose"
OURS = ("worker", "nightly-worker", "beat", "flower", "api")
# What every batchinfer service needs, each documented in .env.example.
REQUIRED_VARIABLES = (
    "REDIS_PASSWORD", "BATCHINFER_BROKER_URL", "BATCHINFER_STORE_URL", "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BATCHINFER_MODELS", "BATCHINFER_MODEL_ROOTS",
    "BATCHINFER_GPU_HOURLY_USD", "FLOWER_BASIC_AUTH", "BATCHINFER_SCAN_INBOX_CRON",
    "BATCHINFER_ROLLUP_CRON", "BATCHINFER_EXPIRE_CRON", "BATCHINFER_RETENTION_DAYS",
    "BATCHINFER_API_KEYS",
)


def _env_example() -> dict[str, str]:
    """.env.example's variables, with ${VAR} expanded from earlier lines as compose does."""
    values: dict[str, str] = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"bad .env line: {line!r}"
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], value)
    return values


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def _has_compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _has_compose_plugin(), reason="docker compose plugin absent: the "
                    "PyYAML checks in this file stand in for it")
def test_docker_compose_config_accepts_the_file(tmp_path):
    # compose/.env is the operator's (and ignored by git): validate against the example.
    folder = tmp_path / "compose"
    folder.mkdir()
    shutil.copy(COMPOSE_DIR / "docker-compose.yml", folder)
    shutil.copy(COMPOSE_DIR / ".env.example", folder / ".env")
    result = subprocess.run(["docker", "compose", "-f", str(folder / "docker-compose.yml"),
                             "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_services_and_how_they_start(compose):
    services = compose["services"]
    assert set(services) == {"redis", "minio", "createbucket", *OURS}
    assert services["redis"]["image"].startswith("redis:")
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["createbucket"]["image"].startswith("minio/mc")
    assert services["createbucket"]["restart"] == "no"
    commands = {name: services[name]["command"] for name in OURS}
    assert commands["worker"] == ["batchinfer", "worker", "--gpus", "all"]
    assert commands["beat"] == ["batchinfer", "beat"]
    assert commands["flower"] == ["batchinfer", "flower", "--address", "0.0.0.0", "--port", "5555"]
    assert commands["api"] == ["batchinfer", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # Published on the host's loopback unless the operator says otherwise.
    assert services["api"]["ports"] == ["${API_PUBLISH_ADDRESS:-127.0.0.1}:8000:8000"]
    assert "batchinfer.nightly" in commands["nightly-worker"]


def test_our_services_build_the_image_and_read_the_env_file(compose):
    for name in OURS:
        service = compose["services"][name]
        build = service["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / build["dockerfile"]).resolve() == COMPOSE_DIR / "Dockerfile"
        assert service["env_file"] == ".env"
        # Values .env derives from others reach the containers expanded (see the file).
        assert service["environment"]["BATCHINFER_BROKER_URL"].startswith(
            "${BATCHINFER_BROKER_URL")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["createbucket"]["condition"] == \
            "service_completed_successfully"


def test_worker_reserves_every_nvidia_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "capabilities": ["gpu"], "count": "all"}]


def test_healthchecks_gate_the_services_that_wait_on_them(compose):
    services = compose["services"]
    for name in ("redis", "minio", "flower", "api"):
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)


def test_redis_needs_a_password_and_persists(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "requirepass" in command and "--appendonly yes" in command
    assert ":?" in redis["environment"]["REDIS_PASSWORD"]  # compose refuses to start without
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_the_real_env_file_stays_out_of_git():
    assert "/compose/.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()


def test_env_example_documents_every_variable(compose):
    example = _env_example()
    for name in REQUIRED_VARIABLES:
        assert name in example, name
    assert example["BATCHINFER_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"
    assert example["BATCHINFER_STORE_URL"] == "s3://batchinfer/"
    assert example["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert example["BATCHINFER_MODEL_ROOTS"] == "/models"
    used = set(re.findall(r"\$\{(\w+)", (COMPOSE_DIR / "docker-compose.yml").read_text()))
    assert used <= set(example), used - set(example)


def test_dockerfile_installs_the_project_as_a_non_root_user():
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM (nvidia/cuda:12\.\S*-runtime|pytorch/pytorch)", dockerfile, re.M)
    assert re.search(r"pip install[^\n]* \.", dockerfile)
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    # The build context is the repository root: .dockerignore keeps .venv and data out.
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:], "the context should be an allow-list"
    for needed in ("pyproject.toml", "engine/", "jobs/", "workers/"):
        assert f"!{needed}" in ignored
