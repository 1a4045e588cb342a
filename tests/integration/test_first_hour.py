"""What a new user meets in the first hour, through the real command line: where output
goes, what a missing worker, an unreachable broker or failed rows look like, the exit
codes, and the commands to list, follow, inspect and delete jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import keys, manifest
from jobs.spec import JobSpec, load_spec
from jobs.store import open_store
from jobs.submit import create_job
from tests.servers import free_port
from tests.worker_processes import running_workers, worker_env
from workers.client import Client
from workers.dispatch import queue_consumers

JOB_TIMEOUT = 300


@pytest.fixture
def queue() -> str:
    """A queue of the test's own on the shared Redis."""
    return f"first-hour-{uuid.uuid4().hex[:8]}"


def cli(*args: str, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def embedded_env(home: Path, **extra: str) -> dict:
    """The environment of a user with nothing configured but BATCHINFER_HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BATCHINFER_STORE_URL", "BATCHINFER_BROKER_URL")}
    return env | {"BATCHINFER_HOME": str(home), "PYTHONPATH": str(Path.cwd()), **extra}


def write_prompts(path: Path, prompts: list[str | None]) -> Path:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(prompts))],
                             "prompt": pa.array(prompts, pa.string())}), path)
    return path


def test_command_results_go_to_stdout_and_the_embedded_store_is_named(tmp_path, tiny_llama):
    env = embedded_env(tmp_path / "home")
    path = write_prompts(tmp_path / "p.parquet", ["the cat", "a dog"])
    submitted = cli("submit", str(path), "--model", str(tiny_llama), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    embedded_line = (f"batchinfer: the embedded store and broker in {tmp_path / 'home'} (set "
                     f"BATCHINFER_HOME, or BATCHINFER_STORE_URL and BATCHINFER_BROKER_URL)")
    assert submitted.stderr.strip() == embedded_line

    status = cli("status", job_id, env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"job {job_id} queued: 0 rows ok, 0 failed of 2; "
                                    f"shards 0/1 done\n")
    assert status.stderr.strip() == embedded_line
    # `status > file` keeps what status says.
    with open(tmp_path / "status.txt", "w") as out:
        subprocess.run([sys.executable, "-m", "workers.cli", "status", job_id], stdout=out,
                       env=env, check=True, capture_output=False, stderr=subprocess.DEVNULL)
    assert (tmp_path / "status.txt").read_text() == status.stdout

    cancelled = cli("cancel", job_id, env=env)
    assert cancelled.stdout == f"job {job_id} cancelled\n"
    reason = json.loads(cli("status", job_id, "--json", env=env).stdout)["reason"]
    assert re.fullmatch(rf"cancelled by \S+@{re.escape(socket.gethostname())} with batchinfer "
                        rf"cancel at 20\d\d-\d\d-\d\dT[0-9:.]+\+00:00", reason), reason

    # The same fact gets the same answer, whichever command asks; a user mistake stays one line.
    unknown = uuid.uuid4().hex
    store_url = f"file://{tmp_path / 'home'}"
    for command in (["status", unknown], ["results", unknown, "-o", str(tmp_path / "o.parquet")],
                    ["errors", unknown], ["delete", unknown], ["cancel", unknown]):
        done = cli(*command, env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr == f"batchinfer: error: job {unknown} not found in {store_url}\n"


def test_an_unreachable_broker_is_one_line_and_fails_the_job(tmp_path, tiny_llama):
    home = tmp_path / "home"
    env = embedded_env(home, BATCHINFER_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    path = write_prompts(tmp_path / "p.parquet", ["the cat"])
    done = cli("submit", str(path), "--model", str(tiny_llama), "--wait", env=env)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()[-1:]
    assert line.startswith("batchinfer: error: cannot reach the broker at redis://127.0.0.1:")
    assert "BATCHINFER_BROKER_URL" in line
    assert len(done.stderr.splitlines()) == 1
    [job] = Client(store_url=f"file://{home}").jobs()
    assert job["state"] == "failed" and job["finished_at"]
    assert job["reason"].startswith("its shards could not be queued: cannot reach the broker")
    # With an idempotency key the key is free again: the same submit works once it is back.
    keyed = cli("submit", str(path), "--model", str(tiny_llama), "--idempotency-key", "k1",
                env=env)
    assert keyed.returncode == 4
    store = open_store(f"file://{home}")
    assert not store.exists(keys.idempotency_key("k1"))


def test_a_queued_job_without_a_worker_says_how_to_start_one(tmp_path, tiny_llama, redis_server,
                                                             s3_store_url, queue):
    env = worker_env(redis_server.url, s3_store_url)
    path = write_prompts(tmp_path / "p.parquet", ["the cat", "a dog"])
    waiting = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "submit", str(path), "--model", str(tiny_llama),
         "--queue", queue, "--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    notice = (f"no worker is consuming queue {queue}: start one with "
              f"`batchinfer worker --queues {queue}`")
    try:
        job_id = waiting.stdout.readline().decode().strip()
        seen = b""
        deadline = time.monotonic() + 60
        while notice.encode() not in seen and time.monotonic() < deadline:
            seen += os.read(waiting.stderr.fileno(), 4096)
        assert notice.encode() in seen, seen.decode(errors="replace")[-2000:]
    finally:
        waiting.kill()
        waiting.wait()
    status = cli("status", job_id, env=env)
    assert status.stdout.splitlines()[-1] == notice

    with running_workers(1, env, tmp_path, ["--queues", queue]) as [worker]:
        deadline = time.monotonic() + 120
        while not worker.is_ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        hostname = worker.hostname.replace("%h", os.uname().nodename)
        assert queue_consumers(queue, broker_url=redis_server.url) == [hostname]
        assert queue_consumers(f"{queue}-other", broker_url=redis_server.url) == []
        final = cli("status", job_id, "--wait", env=env, timeout=JOB_TIMEOUT)
    assert final.returncode == 0, final.stderr
    assert f"job {job_id} completed: 2 rows ok, 0 failed of 2; shards 1/1 done" in final.stderr


def test_chat_rows_for_a_model_without_a_chat_template_fail_at_submit(tmp_path, tiny_llama):
    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"chat": [[{"role": "user", "content": "hi"}]]}), chats)
    env = embedded_env(tmp_path / "home")
    done = cli("submit", str(chats), "--model", str(plain), "--messages-column", "chat", env=env)
    assert done.returncode == 2
    assert done.stderr == (f"batchinfer: error: model '{plain}' has no chat template, so the "
                           f"'chat' messages cannot be rendered; give plain prompts "
                           f"(prompt_column (--prompt-column)) or a chat model\n")
    assert not (tmp_path / "home" / "jobs").exists()
    ok = cli("submit", str(chats), "--model", str(tiny_llama), "--messages-column", "chat",
             env=env)
    assert ok.returncode == 0, ok.stderr


def test_a_relative_model_path_is_stored_absolute(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.chdir(tiny_llama.parent)
    client = Client(store_url=f"file://{tmp_path / 'store'}")
    spec_model = _submitted_model(client, f"./{tiny_llama.name}")
    assert spec_model == str(tiny_llama)
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({tiny_llama.name: str(tiny_llama)}))
    monkeypatch.setenv("BATCHINFER_MODELS", str(registry))
    assert _submitted_model(client, tiny_llama.name) == tiny_llama.name  # the registry's name


def _submitted_model(client: Client, model: str) -> str:
    job_id, _ = create_job(client.store, pa.table({"prompt": ["a"]}), JobSpec(model=model))
    return load_spec(client.store, job_id).model


@pytest.mark.slow
def test_quickstart_worker_submit_watch_results_and_errors(tmp_path, tiny_llama):
    """The README's Quickstart on embedded defaults: a worker, a submit that waits, results,
    and the rows that failed, with exit code 3 because some did."""
    home = tmp_path / "home"
    env = embedded_env(home, BATCHINFER_DTYPE="float32", OMP_NUM_THREADS="1")
    prompts = [f"story {i} about a cat" for i in range(40)]
    prompts[3], prompts[17], prompts[30] = None, "", None
    path = write_prompts(tmp_path / "prompts.parquet", prompts)
    with running_workers(1, env, tmp_path, launcher=True):
        done = cli("submit", str(path), "--model", str(tiny_llama), "--id-column", "id",
                   "--max-tokens", "4", "--shard-size", "10", "--wait", "-o",
                   str(tmp_path / "out.parquet"), env=env, timeout=JOB_TIMEOUT)
    assert done.returncode == 3, done.stderr
    job_id = done.stdout.strip()
    summary = done.stderr[done.stderr.index(f"job {job_id} completed"):].splitlines()
    assert summary[0] == f"job {job_id} completed: 37 rows ok, 3 failed of 40; shards 4/4 done"
    assert summary[2:] == [
        "3 row(s) failed; commonest reasons:",
        "  2 x prompt is null",
        "  1 x prompt is empty",
        f"  every failed row: batchinfer errors {job_id} -o errors.parquet",
        f"wrote 37 result rows to {tmp_path / 'out.parquet'}",
    ]
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 37

    listed = cli("errors", job_id, env=env)
    assert listed.stdout.splitlines() == ["r3\tinvalid\tprompt is null",
                                          "r17\tinvalid\tprompt is empty",
                                          "r30\tinvalid\tprompt is null"]
    written = cli("errors", job_id, "-o", str(tmp_path / "errors.parquet"), env=env)
    assert written.returncode == 0
    errors = pq.read_table(tmp_path / "errors.parquet")
    assert errors.column("id").to_pylist() == ["r3", "r17", "r30"]
    assert Client(store_url=f"file://{home}").job(job_id).errors().equals(errors)

    # Listing, following and deleting.
    assert cli("jobs", "--state", "completed", env=env).stdout.startswith(job_id)
    assert cli("jobs", "--state", "running", env=env).stdout == ""
    followed = cli("status", job_id, "--wait", env=env)
    assert followed.returncode == 3 and f"job {job_id} completed" in followed.stderr
    assert cli("delete", job_id, env=env).stdout == f"job {job_id} deleted\n"
    assert cli("status", job_id, env=env).returncode == 2


def test_jobs_lists_by_state_and_limit_and_delete_refuses_running_jobs(tmp_path, tiny_llama):
    env = embedded_env(tmp_path / "home")
    path = write_prompts(tmp_path / "p.parquet", ["a"])
    ids = [cli("submit", str(path), "--model", str(tiny_llama), env=env).stdout.strip()
           for _ in range(3)]
    cli("cancel", ids[0], env=env)
    assert [line.split()[0] for line in cli("jobs", env=env).stdout.splitlines()] == ids[::-1]
    assert cli("jobs", "--limit", "1", env=env).stdout.split()[0] == ids[2]
    queued = json.loads(cli("jobs", "--state", "queued", "--json", env=env).stdout)
    assert [job["job_id"] for job in queued] == ids[:0:-1]
    assert cli("jobs", "--state", "nonsense", env=env).returncode == 2
    none_failed = cli("errors", ids[1], env=env)
    assert none_failed.stdout == ""
    assert none_failed.stderr.startswith(f"job {ids[1]} has no failed rows\n")
    refused = cli("delete", ids[1], env=env)
    assert refused.returncode == 2
    assert refused.stderr == (f"batchinfer: error: job {ids[1]} is queued; cancel it "
                              f"(batchinfer cancel {ids[1]}) and delete it once it has ended\n")
    assert cli("delete", ids[0], env=env).returncode == 0
    store = open_store(f"file://{tmp_path / 'home'}")
    assert store.list(keys.job_prefix(ids[0])) == []
    assert manifest.load_manifest(store, ids[1])["state"] == "queued"


def test_a_store_that_fails_is_one_line_and_exit_4(tmp_path, s3_server):
    """A bucket that does not exist (a typo in BATCHINFER_STORE_URL): no traceback."""
    env = embedded_env(tmp_path / "home", BATCHINFER_STORE_URL="s3://no-such-bucket-here/jobs")
    for command in (["jobs"], ["status", uuid.uuid4().hex]):
        done = cli(*command, env=env)
        assert done.returncode == 4, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("batchinfer: error: the store or the broker failed: "
                               "NoSuchBucket: An error occurred (NoSuchBucket)"), line
