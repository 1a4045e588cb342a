"""The object store, on both backends: a folder (file://) and the moto S3 server (s3://)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import UserError
from jobs.file_store import FileStore
from jobs.s3_store import MULTIPART_BYTES, RANGE_READ_BUFFER_BYTES, S3Store
from jobs.store import (
    NotFound,
    Store,
    get_json,
    open_store,
    put_json,
)


@pytest.fixture(params=["file", "s3"])
def store(request) -> Store:
    return open_store(request.getfixturevalue(f"{request.param}_store_url"))


def raw_keys(store: Store) -> list[str]:
    """Every object under the store's root as the backend sees it, hidden ones included."""
    if isinstance(store, FileStore):
        return sorted(p.relative_to(store.root).as_posix()
                      for p in store.root.rglob("*") if p.is_file())
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(o["Key"][len(store.prefix) + 1:] for page in pages
                  for o in page.get("Contents", []))


@contextlib.contextmanager
def observing(store: S3Store, event: str, handler):
    """Watch the requests an S3 store makes (its boto3 client is shared, so unhook after)."""
    store.client.meta.events.register(event, handler)
    try:
        yield
    finally:
        store.client.meta.events.unregister(event, handler)


def test_put_get_overwrite_exists_delete(store):
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"one")
    assert store.exists("a/b.txt")
    assert store.get_bytes("a/b.txt") == b"one"
    store.put_bytes("a/b.txt", b"two, longer")
    assert store.get_bytes("a/b.txt") == b"two, longer"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing object is fine
    with pytest.raises(NotFound):
        store.get_bytes("a/b.txt")


def test_json_round_trip(store):
    put_json(store, "x/spec.json", {"model": "m", "n": [1, 2]})
    assert get_json(store, "x/spec.json") == {"model": "m", "n": [1, 2]}


def test_list_is_sorted_by_prefix_and_shows_no_temporary_objects(store):
    for key in ("jobs/b/results/part-00001.parquet", "jobs/b/results/part-00000.parquet",
                "jobs/b/spec.json", "jobs/a/spec.json", "usage/date=2024-01-01/x.parquet"):
        store.put_bytes(key, b"x")
    assert store.list("jobs/b/results/") == ["jobs/b/results/part-00000.parquet",
                                             "jobs/b/results/part-00001.parquet"]
    assert store.list("jobs/b/results/part-00001") == ["jobs/b/results/part-00001.parquet"]
    assert store.list("jobs/") == ["jobs/a/spec.json", "jobs/b/results/part-00000.parquet",
                                   "jobs/b/results/part-00001.parquet", "jobs/b/spec.json"]
    assert len(store.list("")) == 5
    assert store.list("nothing/") == []
    assert store.list_dirs("jobs/") == ["a", "b"]
    assert store.list_dirs("") == ["jobs", "usage"]
    assert store.list_dirs("missing/") == []
    # Atomic writes clean up after themselves: the backend holds only the published keys.
    assert raw_keys(store) == store.list("")


def test_list_hides_temporary_objects_a_crashed_writer_left(store):
    store.put_bytes("jobs/a/spec.json", b"x")
    if isinstance(store, FileStore):
        (store.root / "jobs/a/.tmp-0123-manifest.json").write_bytes(b"half")
    else:
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/jobs/a/.tmp-0-m.json",
                                Body=b"half")
    assert len(raw_keys(store)) == 2
    assert store.list("jobs/") == ["jobs/a/spec.json"]


def test_upload_and_download_file(store, tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(100_000))
    store.upload_file(source, "jobs/j/input.parquet")
    assert store.get_bytes("jobs/j/input.parquet") == source.read_bytes()
    store.download_file("jobs/j/input.parquet", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert raw_keys(store) == ["jobs/j/input.parquet"]
    with pytest.raises(NotFound):
        store.download_file("jobs/j/missing", tmp_path / "never.bin")


def test_open_read_is_a_seekable_file(store):
    data = bytes(range(256)) * 1000
    store.put_bytes("blob", data)
    with store.open_read("blob") as file:
        assert file.seekable()
        file.seek(1000)
        assert file.read(10) == data[1000:1010]
        assert file.tell() == 1010
        file.seek(-5, io.SEEK_END)
        assert file.read() == data[-5:]
        file.seek(0)
        assert file.read() == data
    with pytest.raises(NotFound):
        store.open_read("missing")


def test_pyarrow_reads_parquet_through_open_read(store):
    table = pa.table({"a": list(range(1000)), "b": [str(i) for i in range(1000)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=100)
    store.put_bytes("t.parquet", sink.getvalue().to_pybytes())
    with store.open_read("t.parquet") as file:
        parquet = pq.ParquetFile(file)
        assert parquet.metadata.num_row_groups == 10
        assert parquet.read_row_group(3).column("a").to_pylist() == list(range(300, 400))


def test_etag_changes_when_the_object_is_rewritten(store):
    store.put_bytes("k", b"first")
    first = store.etag("k")
    assert first and store.etag("k") == first
    store.put_bytes("k", b"second version")
    assert store.etag("k") != first
    with pytest.raises(NotFound):
        store.etag("missing")


BAD_KEYS = ["../escape", "a/../../b", "/etc/passwd", "a//b", ".hidden", "a/./b", "a\\..\\b",
            "", "a/\nb", "jobs/.."]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused(store, key):
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
                 lambda: store.exists(key), lambda: store.delete(key),
                 lambda: store.open_read(key)):
        with pytest.raises(ValueError, match="invalid object key"):
            call()
    with pytest.raises(ValueError):
        store.list(key + "/")
    assert raw_keys(store) == []


def test_file_store_refuses_keys_that_leave_the_root_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not read")
    store = open_store(f"file://{tmp_path / 'root'}")
    store.put_bytes("jobs/x", b"inside")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the store root"):
        store.get_bytes("link/secret")
    with pytest.raises(ValueError, match="outside the store root"):
        store.put_bytes("link/new", b"x")
    assert not (outside / "new").exists()


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_store("file://./rel/store")
    assert isinstance(relative, FileStore) and relative.root == tmp_path / "rel" / "store"
    assert open_store(f"file://{tmp_path}/abs").url == f"file://{tmp_path}/abs"
    for url in ("http://x/y", "/plain/path", "gs://bucket"):
        with pytest.raises(UserError, match="unsupported store URL"):
            open_store(url)
    with pytest.raises(UserError):
        open_store("s3://")


def test_s3_store_without_prefix(s3_server):
    store = open_store(f"s3://{s3_server.bucket}")
    assert isinstance(store, S3Store) and store.url == f"s3://{s3_server.bucket}"
    key = f"t-noprefix-{os.getpid()}/k.txt"
    store.put_bytes(key, b"v")
    try:
        assert store.get_bytes(key) == b"v"
        assert key in store.list(key.split("/")[0] + "/")
    finally:
        store.delete(key)


def test_s3_upload_above_8_mib_goes_up_in_parts(s3_store_url, tmp_path):
    store = open_store(s3_store_url)
    calls: list[str] = []
    source = tmp_path / "big.parquet"
    source.write_bytes(os.urandom(MULTIPART_BYTES + 1024 * 1024))
    with observing(store, "provide-client-params.s3.*",
                   lambda params, model, **_: calls.append(model.name)):
        store.upload_file(source, "jobs/j/input.parquet")
    assert calls.count("UploadPart") == 2  # 8 MiB + 1 MiB
    assert calls.count("CompleteMultipartUpload") >= 1
    assert "PutObject" not in calls
    assert store.get_bytes("jobs/j/input.parquet") == source.read_bytes()
    assert raw_keys(store) == ["jobs/j/input.parquet"]


def test_s3_open_read_fetches_only_the_ranges_read(s3_store_url):
    """A shard reading one row group must not download the whole input."""
    store = open_store(s3_store_url)
    rng = random.Random(0)
    table = pa.table({name: [rng.random() for _ in range(200_000)] for name in ("noise", "more")})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=20_000, compression="none")
    data = sink.getvalue().to_pybytes()
    store.put_bytes("in.parquet", data)

    ranges: list[str] = []
    with (observing(store, "provide-client-params.s3.GetObject",
                    lambda params, **_: ranges.append(params["Range"])),
          store.open_read("in.parquet") as file):
        group = pq.ParquetFile(file).read_row_group(7)
    assert group.column("noise").to_pylist() == table.column("noise").to_pylist()[140_000:160_000]
    assert ranges and sum(range_length(r) for r in ranges) < len(data) / 4, (ranges, len(data))


def range_length(header: str) -> int:
    """Bytes a Range header asks for: "bytes=10-19" or a suffix, "bytes=-262144"."""
    start, _, end = header.removeprefix("bytes=").partition("-")
    return int(end) if not start else int(end) - int(start) + 1


def test_s3_open_read_of_a_small_object_is_one_request(s3_store_url):
    """Opening reads the tail (size and version from its answer, no HEAD): a small
    Parquet object's footer and data need no second request."""
    store = open_store(s3_store_url)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": list(range(100))}), sink)
    store.put_bytes("small.parquet", sink.getvalue().to_pybytes())
    calls: list[str] = []
    with (observing(store, "provide-client-params.s3.*",
                    lambda params, model, **_: calls.append(model.name)),
          store.open_read("small.parquet") as file):
        assert pq.read_table(file).column("a").to_pylist() == list(range(100))
    assert calls == ["GetObject"]


def test_s3_open_read_across_the_tail_it_read_at_open(s3_store_url):
    store = open_store(s3_store_url)
    data = random.Random(1).randbytes(2 * RANGE_READ_BUFFER_BYTES + 1000)
    store.put_bytes("big", data)
    tail_start = len(data) - RANGE_READ_BUFFER_BYTES
    with store.open_read("big") as file:
        file.seek(tail_start - 10)
        assert file.read(100) == data[tail_start - 10:tail_start + 90]
        file.seek(0)
        assert file.read() == data


def test_s3_open_read_of_an_empty_object(s3_store_url):
    store = open_store(s3_store_url)
    store.put_bytes("empty", b"")
    with store.open_read("empty") as file:
        assert file.read() == b""


def test_s3_open_read_fails_if_the_object_changes_under_it(s3_store_url):
    store = open_store(s3_store_url)
    size = 3 * RANGE_READ_BUFFER_BYTES  # more than the tail read at open
    store.put_bytes("k", b"a" * size)
    file = store.open_read("k")
    store.put_bytes("k", b"b" * size)
    with pytest.raises(Exception, match="PreconditionFailed|412"):
        file.read()


def test_file_store_write_is_atomic_rename(tmp_path):
    """A published file is never partly written: the temp file is renamed over it."""
    store = open_store(f"file://{tmp_path}")
    store.put_bytes("a/k", b"old")
    inode_before = (tmp_path / "a/k").stat().st_ino
    store.put_bytes("a/k", b"new")
    assert (tmp_path / "a/k").read_bytes() == b"new"
    assert (tmp_path / "a/k").stat().st_ino != inode_before
    assert sorted(p.name for p in Path(tmp_path, "a").iterdir()) == ["k"]


def test_s3_clients_come_from_one_factory_per_endpoint_and_credentials(s3_store_url,
                                                                        monkeypatch):
    """The store and model fetches share engine.s3's client: path addressing for a custom
    endpoint, standard retries; a change of credentials gets a client of its own."""
    from engine.s3 import MAX_ATTEMPTS, s3_client

    client = open_store(s3_store_url).client
    assert client is s3_client() and client is open_store(s3_store_url).client
    assert client.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    assert client.meta.config.s3["addressing_style"] == "path"
    retries = client.meta.config.retries
    assert (retries["mode"], retries["total_max_attempts"]) == ("standard", MAX_ATTEMPTS + 1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    assert s3_client() is not client


def test_the_store_imports_without_torch():
    subprocess.run([sys.executable, "-c",
                    "import sys, jobs.store; assert 'torch' not in sys.modules"], check=True)


def append_to(entry: str):
    """An update that adds entry to a JSON list (starting one where there is none)."""
    def change(current: bytes | None) -> bytes:
        return json.dumps([*(json.loads(current) if current else []), entry]).encode()
    return change


def test_update_reads_changes_and_writes(store):
    assert store.update("jobs/j/n.json", append_to("a")) == b'["a"]'
    assert store.update("jobs/j/n.json", append_to("b")) == b'["a", "b"]'
    assert get_json(store, "jobs/j/n.json") == ["a", "b"]
    assert raw_keys(store) == ["jobs/j/n.json"]


def test_file_store_updates_racing_in_threads_lose_nothing(file_store_url):
    store = open_store(file_store_url)

    def add_many(worker: int) -> None:
        for i in range(25):
            store.update("jobs/j/n.json", append_to(f"{worker}-{i}"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add_many, range(4)))
    assert sorted(get_json(store, "jobs/j/n.json")) == sorted(
        f"{w}-{i}" for w in range(4) for i in range(25))


@pytest.mark.parametrize("existing", [False, True])
def test_s3_update_that_loses_a_race_tries_again_on_what_won(s3_store_url, existing):
    """Another writer gets in between this update's read and its write: the conditional
    put fails (If-Match, or If-None-Match where there was nothing) and the update is
    made again on the winner's object, so neither write is lost."""
    store = open_store(s3_store_url)
    if existing:
        store.update("n.json", append_to("first"))
    seen = []

    def change(current: bytes | None) -> bytes:
        seen.append(current)
        if len(seen) == 1:  # the other writer, between our read and our write
            store.update("n.json", append_to("other"))
        return append_to("mine")(current)

    store.update("n.json", change)
    assert get_json(store, "n.json") == ["first"] * existing + ["other", "mine"]
    assert len(seen) == 2
