"""`batchinfer flower`: refuses to run without credentials; and, live, against the test Redis
with a real worker running an inbox job, its API (behind basic auth) lists the worker and
the shard tasks with their state and progress, and a real browser renders the tasks page."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import manifest
from jobs.errors import UserError
from jobs.store import Store, get_json, open_store
from tests.servers import free_port, log_tail, wait_until
from tests.worker_processes import running_workers, worker_env
from workers.app import create_app
from workers.beat import NIGHTLY_QUEUE
from workers.flower import TASKS_COLUMNS, flower_environment, is_loopback

USER, PASSWORD = "ops", f"pw-{uuid.uuid4().hex[:12]}"
JOB_TIMEOUT = 180


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_credentials_are_required_unless_loopback_dev_is_asked_for():
    env = flower_environment(None, "0.0.0.0", False, {"FLOWER_BASIC_AUTH": "a:b", "PATH": "/x"})
    assert env["FLOWER_BASIC_AUTH"] == "a:b" and env["PATH"] == "/x"
    assert flower_environment("c:d", "0.0.0.0", False, {})["FLOWER_BASIC_AUTH"] == "c:d"
    # Unauthenticated only on loopback, only when asked, and never with an open API.
    dev = flower_environment(None, "127.0.0.1", True, {"FLOWER_UNAUTHENTICATED_API": "true"})
    assert "FLOWER_BASIC_AUTH" not in dev and "FLOWER_UNAUTHENTICATED_API" not in dev
    with pytest.raises(UserError, match="needs credentials"):
        flower_environment(None, "127.0.0.1", False, {})
    with pytest.raises(UserError, match="loopback"):
        flower_environment(None, "0.0.0.0", True, {})
    with pytest.raises(UserError, match="user:password") as refused:
        flower_environment("admin:", "127.0.0.1", False, {})
    assert "admin" not in str(refused.value)
    assert [is_loopback(a) for a in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1")] \
        == [True, True, True, False, False]


def test_the_command_refuses_in_one_line_without_printing_secrets():
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    refused = run_cli("flower", env=env)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "FLOWER_BASIC_AUTH" in refused.stderr
    exposed = run_cli("flower", "--address", "0.0.0.0", "--insecure-loopback-dev", env=env)
    assert exposed.returncode == 2 and "loopback" in exposed.stderr
    bad = run_cli("flower", env=env | {"FLOWER_BASIC_AUTH": "only-a-secret-word"})
    assert bad.returncode == 2 and "only-a-secret-word" not in bad.stderr


# --- live -------------------------------------------------------------------------------

@dataclass
class LiveFlower:
    port: int
    log_path: Path
    worker_hostname: str
    job_id: str
    store: Store
    inbox_rows: int
    # (state, result) of every batchinfer.run_shard task seen while the job ran, by task id.
    seen: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def http_get(url: str, credentials: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _is_up(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthcheck")[0] == 200
    except OSError:
        return False


def api(live: LiveFlower, path: str):
    status, body = http_get(live.url(path), f"{USER}:{PASSWORD}")
    assert status == 200, body
    return json.loads(body)


def inbox_table(rows: int) -> pa.Table:
    words = "the cat dog bird ran saw a big red ball in park once upon time".split()
    return pa.table({"id": [f"q{i:03d}" for i in range(rows)],
                     "prompt": [" ".join(words[(i + k) % len(words)] for k in range(3 + i % 5))
                                for i in range(rows)]})


@pytest.fixture(scope="module")
def live(redis_server, s3_server, tiny_llama, tmp_path_factory) -> Iterator[LiveFlower]:
    """Flower and a worker (shards + nightly queue) on the test Redis; an inbox file run as a
    job, from the scan task to the outbox, while Flower is polled."""
    workdir = tmp_path_factory.mktemp("flower")
    store_url = f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"
    store = open_store(store_url)
    rows = 160
    sink = io.BytesIO()
    pq.write_table(inbox_table(rows), sink)
    store.put_bytes("inbox/questions.parquet", sink.getvalue())
    store.put_bytes("inbox/questions.spec.json", json.dumps(
        {"id_column": "id", "max_tokens": 128, "shard_size": rows // 2}).encode())

    # One sequence at a time: each shard runs for seconds (10,240 engine steps), a window in
    # which polling Flower surely sees it in the PROGRESS state, however loaded the machine.
    env = worker_env(redis_server.url, store_url, BATCHINFER_INBOX_MODEL=str(tiny_llama),
                     BATCHINFER_MAX_NUM_SEQS="1")
    port = free_port()
    flower_log = workdir / "flower.log"
    with open(flower_log, "wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
            env=env | {"FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _is_up(port), 60, "flower")
        # The worker serves the nightly queue too; --include until workers.app lists the module.
        extra = ["--queues", f"batchinfer,{NIGHTLY_QUEUE}", "--include", "workers.nightly_tasks",
                 "--without-mingle", "--without-gossip"]
        with running_workers(1, env, workdir, extra_args=extra, name="flowerw") as [worker]:
            app = create_app(redis_server.url)
            # The scan is seen through the store: the app keeps no task results.
            app.send_task("batchinfer.nightly.scan_inbox", queue=NIGHTLY_QUEUE)
            wait_until(lambda: _submitted_job(store), 120, "the inbox scan")
            result = LiveFlower(port, flower_log, worker.hostname.replace(
                "%h", socket.gethostname()), _submitted_job(store), store, rows)
            _follow_job(result, worker)
            app.send_task("batchinfer.nightly.scan_inbox", queue=NIGHTLY_QUEUE)
            wait_until(lambda: store.exists("outbox/questions/manifest.json"), 60,
                       "delivery to the outbox")
            yield result
    except BaseException:
        print(f"--- flower log ---\n{log_tail(flower_log)}")
        raise
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(30)


def _submitted_job(store: Store) -> str | None:
    markers = store.list("inbox/_processed/")
    return get_json(store, markers[0]).get("job_id") if markers else None


def _follow_job(live: LiveFlower, worker) -> None:
    """Poll Flower's task list until the job ends, keeping each shard task's states."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while manifest.load_manifest(live.store, live.job_id)["state"] not in \
            manifest.TERMINAL_STATES:
        assert time.monotonic() < deadline, worker.log()
        assert worker.proc.poll() is None, worker.log()
        tasks = api(live, "/api/tasks?taskname=batchinfer.run_shard")
        for task_id, task in tasks.items():
            history = live.seen.setdefault(task_id, [])
            if not history or history[-1] != (task["state"], task.get("result")):
                history.append((task["state"], task.get("result")))
            assert task["state"] != "FAILURE", (task.get("traceback"), worker.log())
        time.sleep(0.2)


def test_the_api_needs_credentials(live):
    for path in ("/api/tasks", "/api/workers", "/tasks", "/"):
        assert http_get(live.url(path))[0] == 401, path
        assert http_get(live.url(path), f"{USER}:wrong")[0] == 401, path
        assert http_get(live.url(path), f"{USER}:{PASSWORD}")[0] == 200, path


def test_flower_shows_the_shards_with_live_progress(live):
    assert manifest.load_manifest(live.store, live.job_id)["state"] == "completed"
    tasks = api(live, "/api/tasks?taskname=batchinfer.run_shard")
    assert len(tasks) == 2
    for task in tasks.values():
        assert task["state"] == "SUCCESS"
        assert task["worker"] == live.worker_hostname
        assert live.job_id in task["args"]
    # While a shard ran, Flower showed it in the PROGRESS state with its progress text.
    progress = [result for history in live.seen.values() for state, result in history
                if state == "PROGRESS"]
    assert progress, live.seen
    assert all(f"job {live.job_id[:8]} shard" in text and "rows" in text for text in progress)


def test_flower_lists_the_worker(live):
    workers = api(live, "/api/workers?refresh=1")
    assert live.worker_hostname in workers
    assert "batchinfer.run_shard" in workers[live.worker_hostname]["registered"]


def test_the_job_reached_the_outbox(live):
    results = pq.read_table(live.store.open_read("outbox/questions/results.parquet"))
    assert results.num_rows == live.inbox_rows
    assert get_json(live.store, "outbox/questions/manifest.json")["state"] == "completed"


def test_secrets_stay_out_of_the_log(live):
    log = live.log_path.read_text(errors="replace")
    assert "Visit me at" in log and PASSWORD not in log


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (make test installs it)")
def test_a_browser_renders_the_tasks_page(live, tmp_path):
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{live.port}/tasks"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--no-first-run", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
            # The task table is filled by the page's own requests after it loads.
            "--virtual-time-budget=5000"]
    screenshot = tmp_path / "flower-tasks.png"
    shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True,
                          text=True, timeout=90)
    assert screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert "batchinfer.run_shard" in dom.stdout, dom.stderr[-2000:]
    for task_id in api(live, "/api/tasks?taskname=batchinfer.run_shard"):
        assert task_id in dom.stdout
    assert "result" in TASKS_COLUMNS and ">Result<" in dom.stdout
