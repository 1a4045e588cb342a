"""Running shards through the real engine (a tiny random-weight Llama on the CPU)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine import LLM, SamplingParams
from jobs import keys, manifest, runner
from jobs.finalize import finalize_job
from jobs.planner import Shard
from jobs.progress import write_progress
from jobs.results import merge_results
from jobs.shard_input import read_shard_rows
from jobs.spec import JobSpec
from jobs.store import get_json, open_store
from jobs.submit import create_job
from jobs.tables import put_table, read_table
from jobs.usage import USAGE_SCHEMA

ENGINE_OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory="64MiB")
WORDS = "the cat dog bird ran saw a big red ball in park once upon time".split()
DEFAULT_MAX_TOKENS = 6


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    """The engine the shards run on, reused across shards as a worker does."""
    return LLM(model=str(tiny_llama), **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def direct_llm(tiny_llama) -> LLM:
    """A second engine, the oracle: what engine.LLM.generate gives for the same rows."""
    return LLM(model=str(tiny_llama), **ENGINE_OPTIONS)


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(1 + i % 9))


def prompts_table(rows: int = 30) -> pa.Table:
    """Varied prompts with overrides, a pass-through column and five rows that cannot run."""
    prompts = [prompt(i) for i in range(rows)]
    prompts[3], prompts[8], prompts[13] = None, "", "the cat " * 400  # > 512-token context
    max_tokens = [None if i % 3 else 2 + i % 5 for i in range(rows)]
    max_tokens[20], max_tokens[21] = 0, 2.5  # invalid per-row overrides
    return pa.table({
        "id": [f"r{i:03d}" for i in range(rows)],
        "prompt": prompts,
        "category": [f"c{i % 4}" for i in range(rows)],
        "max_tokens": pa.array(max_tokens, pa.float64()),
        "temperature": [0.8 if i % 4 == 1 else None for i in range(rows)],
        "seed": [100 + i if i % 4 == 1 else None for i in range(rows)],
        "stop": [["dog"] if i % 7 == 2 else None for i in range(rows)],
    })


INVALID = {"r003": "prompt is null", "r008": "prompt is empty", "r013": "context length",
           "r020": "max_tokens must be at least 1", "r021": "max_tokens must be an integer"}


def expected_outputs(direct_llm: LLM, table: pa.Table) -> dict[str, tuple]:
    rows = [r for r in table.to_pylist() if r["id"] not in INVALID]
    params = [SamplingParams(
        max_tokens=int(r["max_tokens"] or DEFAULT_MAX_TOKENS),
        temperature=0.0 if r["temperature"] is None else r["temperature"],
        seed=r["seed"], stop=r["stop"]) for r in rows]
    outs = direct_llm.generate([r["prompt"] for r in rows], params)
    return {r["id"]: (o.text, o.finish_reason, o.prompt_tokens, o.completion_tokens)
            for r, o in zip(rows, outs, strict=True)}


@pytest.fixture(params=["file", "s3"])
def store(request):
    return open_store(request.getfixturevalue(f"{request.param}_store_url"))


def submit(store, tmp_path, table: pa.Table, row_group_size: int, **spec) -> tuple[str, list]:
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    return create_job(store, path, JobSpec(model="tiny", **spec))


def test_shards_give_what_the_engine_gives_directly(store, tmp_path, llm, direct_llm,
                                                    monkeypatch):
    monkeypatch.setenv("BATCHINFER_GPU_HOURLY_USD", "3.6")
    table = prompts_table()
    job_id, shards = submit(store, tmp_path, table, row_group_size=5, id_column="id",
                            max_tokens=DEFAULT_MAX_TOKENS, shard_size=8)
    assert [(s.row_start, s.row_end) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20),
                                                          (20, 25), (25, 30)]
    progress_calls = []
    summaries = [runner.run_shard(store, job_id, s.index, llm, worker="w1",
                                  on_progress=lambda *a: progress_calls.append(a))
                 for s in shards]

    assert [s.skipped or s.cancelled for s in summaries] == [False] * len(shards)
    assert sum(s.succeeded for s in summaries) == 25
    assert sum(s.failed for s in summaries) == 5
    assert progress_calls[0][:2] == (0, 5) and progress_calls[-1][:2] == (5, 5)

    results = merge_results(store, job_id)
    assert results.column_names == ["id", "category", "max_tokens", "temperature", "seed", "stop",
                                    "output", "finish_reason", "prompt_tokens",
                                    "completion_tokens", "cached_tokens"]
    ids = results.column("id").to_pylist()
    assert ids == [f"r{i:03d}" for i in range(30) if f"r{i:03d}" not in INVALID]
    by_id = {r["id"]: r for r in results.to_pylist()}
    source = {r["id"]: r for r in table.to_pylist()}
    for row_id, row in by_id.items():
        for column in ("category", "max_tokens", "temperature", "seed", "stop"):
            assert row[column] == source[row_id][column], (row_id, column)

    expected = expected_outputs(direct_llm, table)
    got = {i: (r["output"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"])
           for i, r in by_id.items()}
    assert got == expected
    assert by_id["r000"]["completion_tokens"] == 2  # per-row max_tokens applied
    assert all(r["completion_tokens"] <= DEFAULT_MAX_TOKENS for r in by_id.values())

    errors = pa.concat_tables([read_table(store, k)
                               for k in store.list(keys.errors_prefix(job_id))])
    assert errors.column_names == ["id", "error", "error_kind"]
    assert set(errors.column("error_kind").to_pylist()) == {"invalid"}
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("error").to_pylist(),
                       strict=True))
    assert set(reasons) == set(INVALID)
    for row_id, fragment in INVALID.items():
        assert fragment in reasons[row_id], reasons[row_id]

    usage_keys = [k for k in store.list("usage/") if job_id in k]
    assert len(usage_keys) == len(shards)
    usage = pa.concat_tables([read_table(store, k) for k in usage_keys])
    assert usage.schema == USAGE_SCHEMA
    assert usage.column("shard").to_pylist() == list(range(len(shards)))
    assert pc.sum(usage.column("rows")).as_py() == 30
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        assert pc.sum(usage.column(name)).as_py() == pc.sum(results.column(name)).as_py()
    for record in usage.to_pylist():
        assert record["job_id"] == job_id and record["model"] == "tiny"
        assert record["worker"] == "w1" and record["device"] == "cpu"
        assert record["quantization"] is None
        assert record["started_at"] <= record["finished_at"]
        assert record["busy_seconds"] > 0
        assert record["cost_usd"] == pytest.approx(record["busy_seconds"] / 1000)
        tokens = record["prompt_tokens"] + record["completion_tokens"]
        assert record["tokens_per_second"] == pytest.approx(tokens / record["busy_seconds"])
        if tokens:
            assert record["cost_per_million_tokens"] == pytest.approx(
                record["cost_usd"] / tokens * 1e6)
            assert 0 < record["occupancy"] <= 1 and record["mean_tokens_per_step"] > 0

    for shard in shards:
        progress = get_json(store, keys.progress_key(job_id, shard.index))
        assert progress["done"] == progress["total"] == shard.num_rows

    final = finalize_job(store, job_id)
    assert final["state"] == "completed"
    assert final["counts"] == {"total_rows": 30, "succeeded_rows": 25, "failed_rows": 5,
                               "shards_total": 6, "shards_done": 6}
    assert final["usage"]["completion_tokens"] == pc.sum(results["completion_tokens"]).as_py()
    assert final["usage"]["cost_usd"] == pytest.approx(pc.sum(usage["cost_usd"]).as_py())


def test_a_done_shard_is_not_run_again(file_store_url, tmp_path, llm):
    store = open_store(file_store_url)
    job_id, shards = submit(store, tmp_path, prompts_table().slice(0, 10), row_group_size=10, shard_size=10,
                            max_tokens=3)
    first = runner.run_shard(store, job_id, 0, llm)
    written = {k: store.etag(k) for k in store.list("")}
    again = runner.run_shard(store, job_id, 0, llm,
                             on_progress=lambda *a: pytest.fail("ran again"))
    assert again.skipped and not first.skipped
    assert (again.succeeded, again.failed, again.rows) == (
        first.succeeded, first.failed, 10)
    assert {k: store.etag(k) for k in store.list("")} == written


def test_a_rerun_after_a_crash_replaces_the_dead_attempts_files(file_store_url, tmp_path, llm):
    """A worker died after writing progress, errors and usage but before the results part
    (a run writes its progress before its errors: how a rerun knows to look)."""
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(6)]})
    job_id, _ = submit(store, tmp_path, table, row_group_size=6, max_tokens=3)
    write_progress(store, job_id, 0, done=6, total=6, tokens=30, tokens_per_second=1.0,
                   occupancy=0.5, failed=1)
    put_table(store, keys.error_key(job_id, 0), pa.table({"row_index": [0], "error": ["stale"]}))
    summary = runner.run_shard(store, job_id, 0, llm)
    assert (summary.succeeded, summary.failed) == (6, 0)
    assert not store.exists(keys.error_key(job_id, 0))
    assert finalize_job(store, job_id)["counts"]["failed_rows"] == 0


def test_a_rerun_on_a_later_day_leaves_one_usage_record(file_store_url, tmp_path, llm):
    """The dead run of a job created two days ago wrote its usage record that day; the
    rerun's record (today) replaces it: the daily rollups count the shard once."""
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(6)]})
    job_id, _ = submit(store, tmp_path, table, row_group_size=6, max_tokens=3)
    today = datetime.now(UTC)
    created = today - timedelta(days=2)
    manifest.update_manifest(store, job_id, created_at=created.isoformat())
    write_progress(store, job_id, 0, done=6, total=6, tokens=30, tokens_per_second=1.0,
                   occupancy=0.5)
    dead_run = keys.usage_key(created.date(), job_id, 0)
    put_table(store, dead_run, pa.Table.from_pylist([], schema=USAGE_SCHEMA))
    runner.run_shard(store, job_id, 0, llm)
    assert not store.exists(dead_run)
    assert store.exists(keys.usage_key(today.date(), job_id, 0))


def test_row_index_ids_when_no_id_column(file_store_url, tmp_path, llm):
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(9)], "k": list(range(9))})
    job_id, shards = submit(store, tmp_path, table, row_group_size=3, shard_size=4, max_tokens=2)
    for shard in shards:
        runner.run_shard(store, job_id, shard.index, llm)
    results = merge_results(store, job_id)
    assert results.column_names[:2] == ["row_index", "k"]
    assert results.column("row_index").to_pylist() == list(range(9))
    assert results.column("k").to_pylist() == list(range(9))


def test_messages_are_rendered_with_the_chat_template(file_store_url, tmp_path, llm, direct_llm):
    store = open_store(file_store_url)
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt(i)}]
             for i in range(5)]
    chats[2] = []
    chats[4] = [{"role": "user", "content": None}]
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"chat": pa.array(chats, message_type), "prompt": ["kept"] * 5})
    job_id, _ = submit(store, tmp_path, table, row_group_size=5, messages_column="chat",
                       max_tokens=4)
    runner.run_shard(store, job_id, 0, llm)

    results = merge_results(store, job_id)
    assert results.column("row_index").to_pylist() == [0, 1, 3]
    assert results.column("prompt").to_pylist() == ["kept"] * 3
    texts = [direct_llm.tokenizer.apply_chat_template(chats[i], tokenize=False,
                                                      add_generation_prompt=True)
             for i in (0, 1, 3)]
    assert texts[0].endswith("assistant:")
    direct = direct_llm.generate(texts, SamplingParams(max_tokens=4, temperature=0.0))
    assert results.column("output").to_pylist() == [o.text for o in direct]
    assert results.column("prompt_tokens").to_pylist() == [o.prompt_tokens for o in direct]
    errors = read_table(store, keys.error_key(job_id, 0)).to_pylist()
    assert [e["row_index"] for e in errors] == [2, 4]
    assert "empty" in errors[0]["error"] and "no content" in errors[1]["error"]


def test_cancel_aborts_in_flight_rows_and_writes_nothing(file_store_url, tmp_path, llm,
                                                         monkeypatch):
    monkeypatch.setattr(runner, "CANCEL_CHECK_SECONDS", 0.0)
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(12)]})
    job_id, _ = submit(store, tmp_path, table, row_group_size=12, max_tokens=20)
    asked = []

    def cancel_on_third_check() -> bool:
        asked.append(llm.num_unfinished_requests())
        return len(asked) == 3

    summary = runner.run_shard(store, job_id, 0, llm, should_cancel=cancel_on_third_check)
    assert summary.cancelled and summary.succeeded == 0
    assert asked[-1] > 0, "rows were in flight when the cancel came"
    assert not store.exists(keys.result_key(job_id, 0))
    assert not store.exists(keys.error_key(job_id, 0))
    assert [k for k in store.list("usage/") if job_id in k] == []
    leftovers = llm.step()  # the aborted requests are handed back once, then gone
    assert {o.finish_reason for o in leftovers} == {"aborted"}
    assert not llm.has_unfinished_requests()

    # The shard runs normally later, unbothered by the aborted requests.
    assert runner.run_shard(store, job_id, 0, llm).succeeded == 12


def test_a_rerun_right_after_a_cancel_runs_every_row(file_store_url, tmp_path, tiny_llama,
                                                     direct_llm, monkeypatch):
    """A retry after a cancel: the worker's next shard is the cancelled one, and its first
    engine step hands back the cancelled run's aborted requests."""
    monkeypatch.setattr(runner, "CANCEL_CHECK_SECONDS", 0.0)
    engine = LLM(model=str(tiny_llama), **ENGINE_OPTIONS)  # its own: it may be left dirty
    store = open_store(file_store_url)
    prompts = [prompt(i) for i in range(12)]
    job_id, _ = submit(store, tmp_path, pa.table({"prompt": prompts}), row_group_size=12,
                       max_tokens=20)
    checks = []

    def cancel_on_third_check() -> bool:
        checks.append(engine.num_unfinished_requests())
        return len(checks) == 3

    assert runner.run_shard(store, job_id, 0, engine,
                            should_cancel=cancel_on_third_check).cancelled
    assert engine.num_unfinished_requests() == checks[-1] > 0, "aborted rows not handed back yet"

    summary = runner.run_shard(store, job_id, 0, engine)
    assert (summary.succeeded, summary.failed) == (12, 0)
    assert not store.exists(keys.error_key(job_id, 0))
    direct = direct_llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    assert merge_results(store, job_id).column("output").to_pylist() == [o.text for o in direct]
    assert not engine.has_unfinished_requests(), "the rerun left requests in the engine"


def test_in_flight_requests_stay_bounded(file_store_url, tmp_path, tiny_llama):
    class PeakCountingLLM(LLM):
        """The real engine, noting how many requests it holds when each one arrives."""

        peak = 0

        def add_request(self, request_id, prompt, params=None):
            super().add_request(request_id, prompt, params)
            self.peak = max(self.peak, self.num_unfinished_requests())

    small = PeakCountingLLM(model=str(tiny_llama), max_num_seqs=2, **ENGINE_OPTIONS)
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(20)]})
    job_id, _ = submit(store, tmp_path, table, row_group_size=20, max_tokens=2)
    assert runner.run_shard(store, job_id, 0, small).succeeded == 20
    assert small.peak == runner.IN_FLIGHT_PER_SEQ_SLOT * 2


def test_progress_is_reported_while_running(file_store_url, tmp_path, llm, monkeypatch):
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0.0)
    store = open_store(file_store_url)
    table = pa.table({"prompt": [prompt(i) for i in range(8)]})
    job_id, _ = submit(store, tmp_path, table, row_group_size=8, max_tokens=4)
    calls = []
    runner.run_shard(store, job_id, 0, llm, on_progress=lambda *a: calls.append(a))
    done = [c[0] for c in calls]
    assert len(calls) > 3 and done == sorted(done) and done[-1] == 8
    assert all(c[1] == 8 for c in calls)
    assert calls[-1][2] > 0 and 0 < calls[-1][3] <= 1  # tokens/s and batch fill


def test_a_shard_reads_only_its_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [str(i) for i in range(20)]}), path, row_group_size=5)
    requested = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        requested.append(row_groups)
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows = read_shard_rows(pq.ParquetFile(path), Shard(1, 7, 13))
    assert rows.column("prompt").to_pylist() == [str(i) for i in range(7, 13)]
    assert requested == [[1, 2]]


def test_an_unknown_shard_is_refused(file_store_url, tmp_path, llm):
    store = open_store(file_store_url)
    job_id, _ = submit(store, tmp_path, pa.table({"prompt": ["a"]}), row_group_size=1)
    with pytest.raises(ValueError, match="has 1 shards, not shard 1"):
        runner.run_shard(store, job_id, 1, llm)


def test_logprob_columns_follow_the_rows_that_ask(file_store_url, tmp_path, llm, direct_llm):
    """A per-row logprobs column (null: not asked) and job-level prompt_logprobs: the
    results hold the engine's own figures, the per-row count is consumed, not passed on."""
    store = open_store(file_store_url)
    table = pa.table({"id": ["a", "b", "c"], "prompt": [prompt(i) for i in range(3)],
                      "logprobs": pa.array([2, None, 0], pa.int64())})
    job_id, _ = submit(store, tmp_path, table, row_group_size=3, id_column="id", max_tokens=5,
                       prompt_logprobs=1)
    runner.run_shard(store, job_id, 0, llm)
    rows = {r["id"]: r for r in merge_results(store, job_id).to_pylist()}
    assert "logprobs" in rows["a"] and rows["b"]["logprobs"] is None
    [expected] = direct_llm.generate([prompt(0)], SamplingParams(max_tokens=5, temperature=0,
                                                                  logprobs=2, prompt_logprobs=1))
    got = rows["a"]["logprobs"]
    assert [p["token_id"] for p in got] == expected.token_ids
    for position, entries in zip(got, expected.outputs[0].logprobs, strict=True):
        assert position["logprob"] == pytest.approx(entries[position["token_id"]].logprob,
                                                    abs=1e-5)
        assert {t["token_id"] for t in position["top"]} == set(entries)
    assert rows["a"]["cumulative_logprob"] == pytest.approx(
        expected.outputs[0].cumulative_logprob, abs=1e-4)
    assert all(len(p["top"]) == 1 for p in rows["c"]["logprobs"])  # K=0: the token alone
    for row in rows.values():
        assert len(row["prompt_logprobs"]) == row["prompt_tokens"] - 1


def test_samples_are_rows_of_their_own_and_count_once(file_store_url, tmp_path, llm,
                                                      direct_llm):
    """A per-row n column: one result row per sample, numbered by sample_index, in input
    then sample order, the id and pass-through columns repeated, each sample the engine's
    own; the manifest counts input rows, usage every sample's tokens once per prompt."""
    store = open_store(file_store_url)
    table = pa.table({"id": ["a", "b", "c"], "prompt": [prompt(i) for i in range(3)],
                      "category": ["x", "y", "z"], "n": pa.array([3, None, 2], pa.int64())})
    job_id, _ = submit(store, tmp_path, table, row_group_size=3, id_column="id", max_tokens=5,
                       temperature=1.0, seed=11)
    summary = runner.run_shard(store, job_id, 0, llm)
    rows = merge_results(store, job_id).to_pylist()
    assert [(r["id"], r["sample_index"], r["category"]) for r in rows] == [
        ("a", 0, "x"), ("a", 1, "x"), ("a", 2, "x"), ("b", 0, "y"), ("c", 0, "z"),
        ("c", 1, "z")]
    expected = direct_llm.generate(
        [prompt(i) for i in range(3)],
        [SamplingParams(max_tokens=5, temperature=1.0, seed=11, n=n) for n in (3, 1, 2)])
    by_row = dict(zip("abc", expected, strict=True))
    for row in rows:
        sample = by_row[row["id"]].outputs[row["sample_index"]]
        assert (row["output"], row["finish_reason"], row["completion_tokens"]) == (
            sample.text, sample.finish_reason, len(sample.token_ids))
        assert row["prompt_tokens"] == by_row[row["id"]].prompt_tokens
    prompt_tokens = sum(o.prompt_tokens for o in expected)
    generated = sum(len(s.token_ids) for o in expected for s in o.outputs)
    assert (summary.succeeded, summary.prompt_tokens, summary.completion_tokens) == (
        3, prompt_tokens, generated)
    [usage_key] = [k for k in store.list("usage/") if job_id in k]
    [usage] = read_table(store, usage_key).to_pylist()
    assert (usage["rows"], usage["prompt_tokens"], usage["completion_tokens"]) == (
        3, prompt_tokens, generated)
    assert runner.run_shard(store, job_id, 0, llm).succeeded == 3  # the done part's count
    manifest = finalize_job(store, job_id)
    assert manifest["counts"]["succeeded_rows"] == 3


def test_a_worker_reads_a_jobs_input_footer_once(s3_store_url, tmp_path, llm):
    """The footer grows with the input's row groups; a shard after the worker's first one
    of the job reads only the tail that opening the input reads and its own rows."""
    store = open_store(s3_store_url)
    rows = 3000  # one row group each: a footer several times the tail read at open
    job_id, shards = submit(store, tmp_path, pa.table({"prompt": [prompt(i) for i in range(rows)]}),
                            row_group_size=1, shard_size=1, max_tokens=1)
    assert len(shards) == rows
    reads: list[list[str]] = []

    def note(params, **_) -> None:
        if params["Key"].endswith("/input.parquet"):
            reads[-1].append(params.get("Range", ""))

    store.client.meta.events.register("provide-client-params.s3.GetObject", note)
    try:
        for shard in (0, 1500):
            reads.append([])
            assert runner.run_shard(store, job_id, shard, llm).succeeded == 1
    finally:
        store.client.meta.events.unregister("provide-client-params.s3.GetObject", note)
    assert len(reads[0]) > 2, reads[0]  # the first: the tail, the rest of the footer, the rows
    assert len(reads[1]) == 2, reads[1]  # then: the tail and the rows
