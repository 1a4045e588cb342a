"""Limits (jobs/limits.py): an input too big, with too many rows, or a max_tokens over the
ceiling is a one-line error before anything is uploaded or queued; a prompt over the
character limit or the model's context is an error row of kind "invalid" and the job goes
on (the runner here is the real one, on the real engine)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from engine import LLM
from jobs import keys, runner
from jobs.errors import UserError
from jobs.finalize import finalize_job
from jobs.limits import DEFAULTS
from jobs.outcomes import merge_errors
from jobs.spec import JobSpec
from jobs.store import open_store
from jobs.submit import create_job
from tests.reliability.helpers import prompts_table, run_cli, write_input


@pytest.mark.parametrize("case", ["bytes", "rows", "max-tokens-default", "max-tokens-env",
                                  "bad-setting"])
def test_submit_refuses_what_is_over_a_limit(case, tmp_path, redis_server, queue):
    path = write_input(tmp_path, prompts_table(20))
    env = os.environ | {"BATCHINFER_HOME": str(tmp_path / "home"),
                        "BATCHINFER_BROKER_URL": redis_server.url}
    args = ["submit", str(path), "--model", "m", "--queue", queue]
    expected = {"bytes": "BATCHINFER_MAX_INPUT_BYTES", "rows": "BATCHINFER_MAX_INPUT_ROWS",
                "max-tokens-default": "BATCHINFER_MAX_TOKENS_LIMIT",
                "max-tokens-env": "BATCHINFER_MAX_TOKENS_LIMIT",
                "bad-setting": "BATCHINFER_MAX_INPUT_ROWS"}[case]
    if case == "bytes":
        env["BATCHINFER_MAX_INPUT_BYTES"] = str(path.stat().st_size - 1)
    elif case == "rows":
        env["BATCHINFER_MAX_INPUT_ROWS"] = "19"
    elif case == "max-tokens-default":
        args += ["--max-tokens", str(DEFAULTS["BATCHINFER_MAX_TOKENS_LIMIT"] + 1)]
    elif case == "max-tokens-env":
        env["BATCHINFER_MAX_TOKENS_LIMIT"] = "64"
        args += ["--max-tokens", "65"]
    else:
        env["BATCHINFER_MAX_INPUT_ROWS"] = "lots"
    done = run_cli(*args, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("batchinfer: error: ")
    assert expected in done.stderr
    assert not (tmp_path / "home" / "jobs").exists(), "nothing is uploaded"
    # At the limit itself the same input is fine.
    if case == "bytes":
        env["BATCHINFER_MAX_INPUT_BYTES"] = str(path.stat().st_size)
        assert run_cli(*args, env=env).returncode == 0


def test_the_defaults_are_generous():
    assert DEFAULTS == {"BATCHINFER_MAX_INPUT_BYTES": 50 * 1024**3,
                        "BATCHINFER_MAX_INPUT_ROWS": 100_000_000,
                        "BATCHINFER_MAX_TOKENS_LIMIT": 32768,
                        "BATCHINFER_MAX_PROMPT_CHARS": 1_000_000}
    with pytest.raises(UserError, match="BATCHINFER_MAX_TOKENS_LIMIT"):
        JobSpec(model="m", max_tokens=32769)
    assert JobSpec(model="m", max_tokens=32768).max_tokens == 32768


def test_rows_over_the_prompt_limits_are_invalid_rows(file_store_url, tmp_path, tiny_llama,
                                                      monkeypatch):
    monkeypatch.setenv("BATCHINFER_MAX_PROMPT_CHARS", "300")
    monkeypatch.setenv("BATCHINFER_MAX_TOKENS_LIMIT", "8")
    store = open_store(file_store_url)
    prompts = ["the cat ran"] * 6
    prompts[1] = "a" * 301  # over the character limit (refused before tokenizing)
    prompts[2] = "the cat " * 37  # under 300 characters, but 300 of them fit the limit
    prompts[3] = "the cat " * 300  # 2400 characters: over the limit too
    table = pa.table({"id": [f"p{i}" for i in range(6)], "prompt": prompts,
                      "max_tokens": [None, None, None, None, 9, 8]})
    job_id, _ = create_job(store, table, JobSpec(model="tiny", id_column="id", max_tokens=4))
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="64MiB",
              max_model_len=64)
    summary = runner.run_shard(store, job_id, 0, llm)
    assert (summary.succeeded, summary.failed) == (2, 4)
    errors = {e["id"]: e for e in merge_errors(store, job_id).to_pylist()}
    assert set(errors) == {"p1", "p2", "p3", "p4"}
    assert {e["error_kind"] for e in errors.values()} == {"invalid"}
    assert "301 characters" in errors["p1"]["error"] and "MAX_PROMPT_CHARS" in errors["p1"]["error"]
    assert "context length 64" in errors["p2"]["error"]  # over the model's context
    assert "2400 characters" in errors["p3"]["error"]
    assert "over the limit of 8" in errors["p4"]["error"]
    final = finalize_job(store, job_id)
    assert final["state"] == "completed"
    assert final["counts"]["succeeded_rows"] == 2 and final["counts"]["failed_rows"] == 4
    assert store.exists(keys.result_key(job_id, 0))
