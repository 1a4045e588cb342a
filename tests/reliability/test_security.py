"""No one in: a worker on a password-protected TLS Redis runs a job and no secret (the Redis
password, the AWS secret key) shows up in any output, log or stored object; a pickled
message is refused, never executed; model paths stay under BATCHINFER_MODEL_ROOTS; job ids
and column names cannot lead outside the store."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kombu import Connection, Exchange, Producer

from jobs import keys
from jobs.tables import read_table
from tests.reliability.helpers import (
    assert_exactly_once,
    prompts_table,
    run_cli,
    wait_for,
    write_input,
)
from workers.client import Client

JOB_TIMEOUT = 120


def test_a_job_over_tls_redis_with_a_password_leaks_no_secret(tmp_path, secure_stack,
                                                               s3_store_url):
    stack = secure_stack
    assert stack.redis.url.startswith("rediss://:pw-")
    env = stack.cli_env(s3_store_url)
    path = write_input(tmp_path, prompts_table(30))
    submitted = run_cli("submit", str(path), "--model", "tiny", "--queue", stack.queue,
                        "--id-column", "id", "--max-tokens", "3", "--shard-size", "10",
                        "--wait", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    outputs = [submitted.stdout, submitted.stderr]
    for command in (["status", job_id, "--json"], ["status", job_id], ["jobs", "--json"],
                    ["results", job_id, "-o", str(tmp_path / "out.parquet")]):
        done = run_cli(*command, env=env)
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]

    client = Client(store_url=s3_store_url)
    status = client.job(job_id).status()
    assert status["state"] == "completed", status
    assert_exactly_once(client, job_id, {f"r{i:05d}" for i in range(30)})
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 30

    stored = [client.store.get_bytes(key) for key in client.store.list("")]
    assert any(job_id.encode() in body for body in stored)
    log = stack.worker.log_path.read_text()
    assert "rediss://:**@" in log  # Celery's banner shows where, not the password
    for secret in (stack.password, stack.aws_secret):
        for text in outputs + [log]:
            assert secret not in text
        for body in stored:
            assert secret.encode() not in body
    manifest = json.dumps(status)
    assert "rediss://" not in manifest and "s3://" not in manifest


def test_a_pickled_message_is_refused_and_never_run(tmp_path, secure_stack):
    stack = secure_stack
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    task_id = uuid.uuid4().hex
    with Connection(stack.redis.url) as connection:
        Producer(connection).publish(
            ((Exploit(),), {}, {}), exchange=Exchange(stack.queue, type="direct"),
            routing_key=stack.queue, serializer="pickle", declare=[],
            headers={"lang": "py", "task": "batchinfer.run_shard", "id": task_id,
                     "root_id": task_id, "argsrepr": "()", "kwargsrepr": "{}"})
    wait_for(lambda: "untrusted content" in stack.worker.log_path.read_text(), 60,
             "the worker refusing the message")
    log = stack.worker.log_path.read_text()
    assert "application/x-python-serialize" in log or "pickle" in log
    assert not marker.exists(), "the pickled payload ran"
    assert stack.worker.proc.poll() is None, "the worker died"
    # It is dropped, not handed back to loop forever.
    with Connection(stack.redis.url) as connection:
        assert connection.default_channel.client.llen(stack.queue) == 0
    # The payload was live: unpickled, it runs.
    pickle.loads(pickle.dumps(Exploit()))
    assert marker.exists()


@pytest.mark.parametrize("model, why", [
    ("escape", "outside the allowed model folders"),  # registry entry -> /etc
    ("/etc", "outside the allowed model folders"),
    ("sneaky", "outside the allowed model folders"),  # a symlink under the root, out of it
    ("../../../../etc", "outside the allowed model folders"),
    ("s3://somewhere/model", "a URI must be registered"),
])
def test_models_resolve_only_inside_the_roots(model, why, tmp_path, secure_stack, s3_store_url):
    client = Client(store_url=s3_store_url, broker_url=secure_stack.redis.url)
    path = write_input(tmp_path, prompts_table(2))
    job = client.submit(path, model=model, queue=secure_stack.queue)
    status = job.wait(timeout=JOB_TIMEOUT)
    assert status["state"] == "failed", status
    assert why in status["reason"], status["reason"]


def test_a_model_outside_the_roots_by_its_real_path(tmp_path, secure_stack, s3_store_url,
                                                    tiny_llama):
    client = Client(store_url=s3_store_url, broker_url=secure_stack.redis.url)
    job = client.submit(write_input(tmp_path, prompts_table(2)), model=str(tiny_llama),
                        queue=secure_stack.queue)
    status = job.wait(timeout=JOB_TIMEOUT)
    assert status["state"] == "failed"
    assert "outside the allowed model folders (BATCHINFER_MODEL_ROOTS)" in status["reason"]


def test_ids_and_column_names_cannot_lead_outside_the_store(tmp_path, secure_stack):
    env = secure_stack.cli_env(f"file://{tmp_path / 'store'}")
    for command in (["status", "../../etc"], ["cancel", "../../../etc/passwd"],
                    ["retry", "..%2f..%2fetc"], ["results", "/etc", "-o", str(tmp_path / "o")]):
        done = run_cli(*command, env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith("batchinfer: error: invalid job id"), done.stderr

    escape = f"../../../../../{tmp_path.name}-evil"
    table = pa.table({"../id": [f"x{i}" for i in range(6)],
                      "../../prompt": ["the cat", "a dog"] * 3,
                      escape: ["kept"] * 6})
    store_url = f"file://{tmp_path / 'store'}"
    client = Client(store_url=store_url, broker_url=secure_stack.redis.url)
    job = client.submit(table, model="tiny", prompt_column="../../prompt", id_column="../id",
                        max_tokens=2, queue=secure_stack.queue)
    assert job.wait(timeout=JOB_TIMEOUT)["state"] == "completed"
    results = job.results()
    assert results.column(escape).to_pylist() == ["kept"] * 6
    assert results.column("../id").to_pylist() == [f"x{i}" for i in range(6)]
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(str(p).startswith("store/") for p in written), written
    assert not list(tmp_path.parent.parent.rglob(f"*{tmp_path.name}-evil*"))
    usage = [read_table(client.store, k) for k in client.store.list(keys.USAGE_PREFIX)
             if job.id in k]
    assert len(usage) == 1
