"""Out of memory on a real worker, and `batchinfer retry`.

The fault is real: once the worker has loaded its model, the test lowers the worker
process's address-space limit (RLIMIT_AS, as a container's memory limit would) so that a
big engine step cannot allocate its activations and PyTorch's CPU allocator fails, as it
does on a machine short of memory. The model has a wide MLP so that memory grows quickly
with the tokens in a step. Nothing in the product knows it is under test.

- A shard of many short rows: the first steps run out of memory, the runner halves the
  requests in flight and takes them back, and every row succeeds.
- A row that runs out of memory even alone: it becomes an error row of kind "transient"
  and the shard goes on; three in a row fail the shard with the reason.
- Once memory is back, `batchinfer retry` (and `Job.retry()`) run exactly those rows, and
  those shards, again: no row is lost, none is duplicated, finished rows are not touched.
- A shard that failed because its model was not there yet (a registry entry pointing at a
  folder still being copied) runs whole on retry once the model is there.
"""

from __future__ import annotations

import json
import resource
import shutil

import pyarrow as pa
import pytest

from engine import LLM, SamplingParams
from jobs import keys
from jobs.outcomes import merge_errors
from jobs.tables import read_table
from tests.reliability.helpers import assert_exactly_once, cli_json, write_input
from tests.worker_processes import running_workers, worker_env
from workers.client import Client

WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()
# What the limit leaves above the worker's address space once its model is loaded: room
# for a step of a few hundred tokens through the wide MLP, not for one of ~1900.
HEADROOM_BYTES = 200 * 1024**2
JOB_TIMEOUT = 120


def short_prompt(i: int) -> str:  # about 25 tokens, each row different
    return f"row {i} " + " ".join(WORDS[(i * 7 + k * k) % len(WORDS)] for k in range(10))


LONG_PROMPT = " ".join(WORDS[(k * k) % len(WORDS)] for k in range(900))  # about 1900 tokens


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@pytest.fixture(scope="module")
def wide_model(make_model):
    return make_model("llama", intermediate_size=16384, max_position_embeddings=4096)


@pytest.mark.slow
def test_out_of_memory_then_retry(tmp_path, redis_server, s3_store_url, wide_model, tiny_llama,
                                  queue):
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    registry = tmp_path / "models.json"
    later_model = tmp_path / "models" / "later"
    registry.write_text(json.dumps({"later": str(later_model)}))
    # glibc: no new 64 MiB arena per thread, and big blocks always mapped and unmapped
    # (not kept in the heap once freed), so the address space the limit counts from is
    # the worker's steady state.
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_MODELS=str(registry),
                     MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="131072",
                     MALLOC_TRIM_THRESHOLD_="131072")
    cli_env = env | {"BATCHINFER_BROKER_URL": redis_server.url}

    def submit(rows: list[str], name: str, model=str(wide_model)):
        table = pa.table({"id": [f"{name}{i:03d}" for i in range(len(rows))], "prompt": rows})
        job = client.submit(write_input(tmp_path, table, f"{name}.parquet"), model=str(model),
                            max_tokens=4, id_column="id", queue=queue, shard_size=1000)
        return job, table

    with running_workers(1, env, tmp_path, ["--queues", queue]) as [worker]:
        warm, _ = submit([short_prompt(0), short_prompt(1)], "warm")  # loads the model
        assert warm.wait(timeout=JOB_TIMEOUT)["state"] == "completed"

        # --- memory runs short ------------------------------------------------------------
        limit = vm_size(worker.pid) + HEADROOM_BYTES
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        rows = [short_prompt(i) for i in range(80)]
        rows.insert(40, LONG_PROMPT)
        oom_job, oom_table = submit(rows, "a")
        status = oom_job.wait(timeout=JOB_TIMEOUT)
        assert status["state"] == "completed", status
        assert status["counts"]["succeeded_rows"] == 80 and status["counts"]["failed_rows"] == 1
        [error] = merge_errors(client.store, oom_job.id).to_pylist()
        assert error["id"] == "a040" and error["error_kind"] == "transient"
        assert "out of memory" in error["error"] and "even alone" in error["error"]
        log = worker.log_path.read_text()
        assert "requests were in flight, now at most" in log  # the batch was cut, not failed

        three_long, _ = submit([LONG_PROMPT] * 3, "b")
        status = three_long.wait(timeout=JOB_TIMEOUT)
        assert status["state"] == "failed", status
        assert "3 rows in a row ran out of memory even alone" in status["reason"]
        assert "BATCHINFER_MAX_NUM_BATCHED_TOKENS" in status["reason"]

        missing, _ = submit(["the cat", "a dog"], "c", model="later")
        status = missing.wait(timeout=JOB_TIMEOUT)
        assert status["state"] == "failed" and "later" in status["reason"], status

        # --- memory is back: retry ----------------------------------------------------------
        resource.prlimit(worker.pid, resource.RLIMIT_AS,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        plan = cli_json("retry", oom_job.id, "--wait", env=cli_env)
        assert plan["round"] == 1 and plan["rows"] == 1 and plan["whole_shards"] == []
        assert plan["row_shards"] == {"0": 1}
        status = oom_job.status()
        assert status["state"] == "completed", status
        assert status["counts"]["succeeded_rows"] == 81 and status["counts"]["failed_rows"] == 0
        assert status["retry"] == {"round": 1, "row_shards": [0]}
        assert merge_errors(client.store, oom_job.id) is None
        nothing = cli_json("retry", oom_job.id, env=cli_env)
        assert nothing["round"] is None  # nothing left to retry

        assert three_long.retry()["whole_shards"] == [0]  # the Python client
        assert three_long.wait(timeout=JOB_TIMEOUT)["state"] == "completed"

        shutil.copytree(tiny_llama, later_model)  # the model has arrived
        assert missing.retry()["whole_shards"] == [0]
        assert missing.wait(timeout=JOB_TIMEOUT)["state"] == "completed"

    # Every row once, in input order; the first run's rows untouched by the retry.
    results = assert_exactly_once(client, oom_job.id, {f"a{i:03d}" for i in range(81)})
    parts = client.store.list(keys.results_prefix(oom_job.id))
    assert parts == [keys.result_key(oom_job.id, 0, 1), keys.result_key(oom_job.id, 0)]
    first_run = read_table(client.store, keys.result_key(oom_job.id, 0))
    assert first_run.num_rows == 80 and "a040" not in first_run.column("id").to_pylist()
    retried = read_table(client.store, keys.result_key(oom_job.id, 0, 1)).to_pylist()
    assert [r["id"] for r in retried] == ["a040"]
    # The rows are what the engine gives for them directly (greedy), the halved batches and
    # the retried row included.
    direct = LLM(model=str(wide_model), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    sample = [0, 39, 40, 41, 80]
    outputs = direct.generate([oom_table.column("prompt")[i].as_py() for i in sample],
                              SamplingParams(max_tokens=4, temperature=0.0))
    by_id = {r["id"]: r for r in results.to_pylist()}
    for i, output in zip(sample, outputs, strict=True):
        assert by_id[f"a{i:03d}"]["output"] == output.text, i
    usage = [k for k in client.store.list("usage/") if oom_job.id in k]
    assert len(usage) == 2  # the first run and the retry: both were work, both are billed
    assert_exactly_once(client, three_long.id, {f"b{i:03d}" for i in range(3)})
    assert_exactly_once(client, missing.id, {"c000", "c001"})


@pytest.mark.slow
def test_out_of_memory_with_two_shards_in_one_engine(tmp_path, redis_server, s3_store_url,
                                                     wide_model, queue):
    """Two shards at once in one worker's engine (BATCHINFER_WORKER_SHARDS=2): a step that
    runs out of memory fails for the shards with requests in it, each takes back and cuts
    its own batch, and every row of both is written once, as the engine gives it."""
    client = Client(store_url=s3_store_url, broker_url=redis_server.url)
    env = worker_env(redis_server.url, s3_store_url, BATCHINFER_WORKER_SHARDS="2",
                     MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="131072",
                     MALLOC_TRIM_THRESHOLD_="131072")

    def submit(rows: list[str], name: str, shard_size: int):
        table = pa.table({"id": [f"{name}{i:03d}" for i in range(len(rows))], "prompt": rows})
        path = write_input(tmp_path, table, f"{name}.parquet", row_group_size=shard_size)
        return client.submit(path, model=str(wide_model), max_tokens=4, id_column="id",
                             queue=queue, shard_size=shard_size), table

    with running_workers(1, env, tmp_path, ["--queues", queue]) as [worker]:
        # Two shards at once, so that both pool threads (their stacks) exist before the limit.
        warm, _ = submit([short_prompt(i) for i in range(4)], "warm", 2)
        assert warm.wait(timeout=JOB_TIMEOUT)["state"] == "completed"
        limit = vm_size(worker.pid) + HEADROOM_BYTES
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        job, table = submit([short_prompt(i) for i in range(160)], "d", 80)
        status = job.wait(timeout=JOB_TIMEOUT)
        assert status["state"] == "completed", status
        assert status["counts"]["succeeded_rows"] == 160, status
        log = worker.log_path.read_text()
    for shard in (0, 1):  # each cut its own batch
        assert f"shard {shard}: out of memory" in log, log[-3000:]
    results = assert_exactly_once(client, job.id, set(table.column("id").to_pylist()))
    direct = LLM(model=str(wide_model), dtype="float32", device="cpu", kv_cache_memory="64MiB")
    sample = [0, 79, 80, 159]
    outputs = direct.generate([table.column("prompt")[i].as_py() for i in sample],
                              SamplingParams(max_tokens=4, temperature=0.0))
    by_id = {r["id"]: r for r in results.to_pylist()}
    for i, output in zip(sample, outputs, strict=True):
        assert by_id[f"d{i:03d}"]["output"] == output.text, i
