"""The nightly inbox scan against real stores (moto S3 over HTTP, a folder) and the test
Redis: one job per file version however often and however concurrently it runs, specs
from sidecars or defaults, rejections, retries, stale claims, and delivery to the outbox
(by the scan, and by a real worker's shard task as the job ends)."""

from __future__ import annotations

import io
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import LLM
from jobs import inbox, keys, manifest
from jobs.finalize import finalize_job
from jobs.runner import run_shard
from jobs.spec import ROW_INDEX_COLUMN, load_spec
from jobs.store import Store, get_json, open_store, put_json
from tests.servers import wait_until
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

# A two-shard job of tiny prompts on a CPU worker, with room for a slow, shared machine.
JOB_TIMEOUT = 180
DEFAULTS = {"BATCHINFER_INBOX_MODEL": "default-model", "BATCHINFER_INBOX_MAX_TOKENS": "7"}


def parquet_bytes(rows: int, prompt_column: str = "prompt") -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({prompt_column: [f"prompt number {i}" for i in range(rows)]}), sink)
    return sink.getvalue()


def job_ids(store: Store) -> list[str]:
    return store.list_dirs(keys.JOBS_PREFIX)


def marker(store: Store, name: str) -> dict:
    [key] = [k for k in store.list(inbox.MARKERS_PREFIX) if k.startswith(
        f"{inbox.MARKERS_PREFIX}{name}.{store.etag(f'inbox/{name}.parquet')}")]
    return get_json(store, key)


@pytest.fixture(params=["s3", "file"])
def client(request, redis_server) -> Client:
    """A client on a fresh store of each kind, sending shards to the test Redis."""
    store_url = request.getfixturevalue(f"{request.param}_store_url")
    return Client(store_url=store_url, broker_url=redis_server.url)


def test_each_file_becomes_one_job_with_its_spec(client):
    store = client.store
    store.put_bytes("inbox/a.parquet", parquet_bytes(3))
    put_json(store, "inbox/a.spec.json", {"model": "m-a", "max_tokens": 5, "temperature": 0.5,
                                          "stop": ["\n"], "shard_size": 2})
    store.put_bytes("inbox/b.parquet", parquet_bytes(2, prompt_column="text"))
    put_json(store, "inbox/b.spec.json", {"prompt_column": "text"})
    store.put_bytes("inbox/notes.txt", b"not a prompt file")
    store.put_bytes("inbox/sub/c.parquet", parquet_bytes(1))  # only files directly in inbox/

    outcome = inbox.scan_inbox(store, client.submit, DEFAULTS)
    assert outcome == {"submitted": ["a", "b"], "delivered": [], "rejected": [], "retry": []}

    a, b = marker(store, "a"), marker(store, "b")
    assert a["state"] == b["state"] == "submitted"
    assert sorted(job_ids(store)) == sorted([a["job_id"], b["job_id"]])
    spec_a, spec_b = load_spec(store, a["job_id"]), load_spec(store, b["job_id"])
    assert (spec_a.model, spec_a.max_tokens, spec_a.temperature, spec_a.stop,
            spec_a.shard_size) == ("m-a", 5, 0.5, ["\n"], 2)
    # b's sidecar sets only the column: the rest comes from the defaults.
    assert (spec_b.model, spec_b.max_tokens, spec_b.prompt_column) == ("default-model", 7, "text")
    assert spec_a.idempotency_key and spec_a.idempotency_key != spec_b.idempotency_key
    assert manifest.load_manifest(store, a["job_id"])["counts"]["shards_total"] == 2

    # A rerun finds both markers: nothing new.
    assert inbox.scan_inbox(store, client.submit, DEFAULTS)["submitted"] == []
    assert len(job_ids(store)) == 2


def test_concurrent_scans_submit_each_file_once(client):
    names = [f"f{i}" for i in range(4)]
    for name in names:
        client.store.put_bytes(f"inbox/{name}.parquet", parquet_bytes(2))
    scanners = 3
    start = threading.Barrier(scanners)
    outcomes: list[dict] = []

    def scan() -> None:
        # Each scanner has its own client and store connection, as separate workers would.
        own = Client(store_url=client.store_url, broker_url=client.broker_url)
        start.wait()
        outcomes.append(inbox.scan_inbox(own.store, own.submit, DEFAULTS))

    threads = [threading.Thread(target=scan) for _ in range(scanners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert len(outcomes) == scanners
    submitted = sorted(name for outcome in outcomes for name in outcome["submitted"])
    assert submitted == names
    markers = {name: marker(client.store, name)["job_id"] for name in names}
    assert sorted(job_ids(client.store)) == sorted(markers.values())


def test_a_new_version_of_a_file_is_a_new_job(client):
    store = client.store
    store.put_bytes("inbox/daily.parquet", parquet_bytes(2))
    first = inbox.scan_inbox(store, client.submit, DEFAULTS)
    store.put_bytes("inbox/daily.parquet", parquet_bytes(5))
    second = inbox.scan_inbox(store, client.submit, DEFAULTS)
    assert first["submitted"] == second["submitted"] == ["daily"]
    assert len(store.list(inbox.MARKERS_PREFIX)) == 2
    totals = sorted(manifest.load_manifest(store, j)["counts"]["total_rows"]
                    for j in job_ids(store))
    assert totals == [2, 5]


def test_bad_files_are_rejected_once_with_the_reason(client):
    store = client.store
    store.put_bytes("inbox/typo.parquet", parquet_bytes(2))
    put_json(store, "inbox/typo.spec.json", {"modle": "m"})
    store.put_bytes("inbox/nocolumn.parquet", parquet_bytes(2, prompt_column="question"))
    put_json(store, "inbox/nocolumn.spec.json", {"model": "m"})
    store.put_bytes("inbox/nomodel.parquet", parquet_bytes(2))

    outcome = inbox.scan_inbox(store, client.submit, {})
    assert sorted(outcome["rejected"]) == ["nocolumn", "nomodel", "typo"]
    assert "modle" in marker(store, "typo")["reason"]
    assert "BATCHINFER_INBOX_MODEL" in marker(store, "nomodel")["reason"]
    told = get_json(store, "outbox/nocolumn/manifest.json")
    assert told["state"] == "rejected" and "prompt" in told["reason"]
    assert told["source"]["key"] == "inbox/nocolumn.parquet"
    assert job_ids(store) == []
    # Rejected is final for this version of the file: a rerun does not try again.
    assert inbox.scan_inbox(store, client.submit, DEFAULTS)["submitted"] == []


def test_a_failed_submission_is_retried_by_the_next_scan(client):
    store = client.store
    store.put_bytes("inbox/later.parquet", parquet_bytes(2))

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    assert inbox.scan_inbox(store, broker_down, DEFAULTS)["retry"] == ["later"]
    assert store.list(inbox.MARKERS_PREFIX) == []  # the claim was given back
    assert inbox.scan_inbox(store, client.submit, DEFAULTS)["submitted"] == ["later"]


def test_a_stale_claim_is_taken_over_and_a_fresh_one_is_respected(client):
    store = client.store
    for name in ("crashed", "busy"):
        store.put_bytes(f"inbox/{name}.parquet", parquet_bytes(2))
    long_ago = datetime.now(UTC) - timedelta(seconds=inbox.STALE_CLAIM_SECONDS + 60)
    for name, when in (("crashed", long_ago), ("busy", datetime.now(UTC))):
        etag = store.etag(f"inbox/{name}.parquet")
        claim = {"source": f"inbox/{name}.parquet", "etag": etag, "state": "claimed",
                 "claimed_at": when.isoformat()}
        put_json(store, f"{inbox.MARKERS_PREFIX}{name}.{etag}.json", claim)

    outcome = inbox.scan_inbox(store, client.submit, DEFAULTS)
    assert outcome["submitted"] == ["crashed"]
    assert marker(store, "busy")["state"] == "claimed"


@pytest.mark.parametrize("store_kind", ["s3", "file"])
def test_create_once_has_one_winner(request, store_kind):
    store = open_store(request.getfixturevalue(f"{store_kind}_store_url"))
    racers = 8
    start = threading.Barrier(racers)
    wins: list[bool] = []

    def race(i: int) -> None:
        start.wait()
        wins.append(store.create_once("claims/x.json", json.dumps({"racer": i}).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(wins) == [False] * (racers - 1) + [True]
    assert store.list("claims/") == ["claims/x.json"]  # no temporary objects left behind


def test_finished_jobs_are_delivered_to_the_outbox(redis_server, file_store_url, tiny_llama):
    client = Client(store_url=file_store_url, broker_url=redis_server.url)
    store = client.store
    table = pa.table({"id": ["x0", "x1", "x2", "x3", "x4"],
                      "prompt": ["once upon a time", "", "the cat", "a dog ran", "big red"]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put_bytes("inbox/stories.parquet", sink.getvalue())
    put_json(store, "inbox/stories.spec.json", {"model": str(tiny_llama), "id_column": "id",
                                                "max_tokens": 3, "shard_size": 3})
    store.put_bytes("outbox/stories/stale.txt", b"left by an earlier version")
    assert inbox.scan_inbox(store, client.submit)["submitted"] == ["stories"]
    job_id = marker(store, "stories")["job_id"]
    # Not finished yet: nothing to deliver.
    assert inbox.scan_inbox(store, client.submit)["delivered"] == []

    # Run the job here, as a worker would (the worker's own path is tested with Celery).
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    for shard in range(2):
        run_shard(store, job_id, shard, llm)
    finalize_job(store, job_id)

    assert inbox.scan_inbox(store, client.submit)["delivered"] == ["stories"]
    assert marker(store, "stories")["state"] == "delivered"
    assert sorted(store.list("outbox/stories/")) == [
        "outbox/stories/errors.parquet", "outbox/stories/manifest.json",
        "outbox/stories/results.parquet"]
    results = pq.read_table(store.open_read("outbox/stories/results.parquet"))
    assert results.column("id").to_pylist() == ["x0", "x2", "x3", "x4"]
    errors = pq.read_table(store.open_read("outbox/stories/errors.parquet"))
    assert errors.column("id").to_pylist() == ["x1"]
    summary = get_json(store, "outbox/stories/manifest.json")
    assert (summary["job_id"], summary["state"]) == (job_id, "completed")
    assert summary["source"] == {"key": "inbox/stories.parquet",
                                 "etag": store.etag("inbox/stories.parquet")}
    # Delivered once: later scans leave it alone.
    assert inbox.scan_inbox(store, client.submit)["delivered"] == []


def test_a_job_is_delivered_to_the_outbox_when_it_ends(redis_server, s3_store_url, tiny_llama,
                                                       tmp_path):
    """The shard task that finalizes an inbox job delivers it: no scan after the job ends."""
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    store = client.store
    queue = f"q-{uuid.uuid4().hex[:10]}"
    store.put_bytes("inbox/tonight.parquet", parquet_bytes(4))
    put_json(store, "inbox/tonight.spec.json", {"model": str(tiny_llama), "max_tokens": 3,
                                                "shard_size": 2, "queue": queue})
    # No worker yet: the job cannot end during the scan that submits it.
    assert inbox.scan_inbox(store, client.submit)["submitted"] == ["tonight"]
    job_id = marker(store, "tonight")["job_id"]

    env = worker_env(redis_server.url, s3_store_url)
    with running_workers(1, env, tmp_path, ["--queues", queue]):
        wait_until(lambda: store.exists("outbox/tonight/manifest.json"), JOB_TIMEOUT,
                   "delivery to the outbox when the job ends")

    assert marker(store, "tonight")["state"] == "delivered"
    summary = get_json(store, "outbox/tonight/manifest.json")
    assert (summary["job_id"], summary["state"]) == (job_id, "completed")
    assert summary["counts"]["succeeded_rows"] == 4
    assert summary["source"] == {"key": "inbox/tonight.parquet",
                                 "etag": store.etag("inbox/tonight.parquet")}
    assert sorted(store.list("outbox/tonight/")) == [
        "outbox/tonight/manifest.json", "outbox/tonight/results.parquet"]
    results = pq.read_table(store.open_read("outbox/tonight/results.parquet"))
    assert results.column(ROW_INDEX_COLUMN).to_pylist() == [0, 1, 2, 3]
    # The scan, the fallback, finds nothing left to deliver.
    assert inbox.scan_inbox(store, client.submit)["delivered"] == []


def test_the_finalizer_delivers_only_what_the_scan_would(redis_server, file_store_url,
                                                         tiny_llama):
    client = Client(store_url=file_store_url, broker_url=redis_server.url)
    store = client.store
    for name in ("daily", "weekly"):
        store.put_bytes(f"inbox/{name}.parquet", parquet_bytes(2))
        put_json(store, f"inbox/{name}.spec.json", {"model": str(tiny_llama), "max_tokens": 2})
    assert inbox.scan_inbox(store, client.submit)["submitted"] == ["daily", "weekly"]
    daily, weekly = marker(store, "daily")["job_id"], marker(store, "weekly")["job_id"]
    by_hand = client.submit(pa.table({"prompt": ["a b c"]}), model=str(tiny_llama),
                            max_tokens=2).id
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    for job_id in (daily, weekly, by_hand):
        run_shard(store, job_id, 0, llm)

    assert not inbox.deliver_finished_job(store, finalize_job(store, by_hand))
    # A newer version of a file owns its folder: the older version's job leaves it alone.
    store.put_bytes("inbox/daily.parquet", parquet_bytes(3))
    assert not inbox.deliver_finished_job(store, finalize_job(store, daily))
    assert inbox.deliver_finished_job(store, finalize_job(store, weekly))
    assert store.list_dirs(inbox.OUTBOX_PREFIX) == ["weekly"]
    # Delivered once: its finalizer running again leaves it alone.
    assert not inbox.deliver_finished_job(store, finalize_job(store, weekly))
