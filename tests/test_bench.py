"""Smoke test of scripts/bench.py: a --quick run end to end, JSON checked, no timing asserts."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "scripts" / "bench.py"
SYSTEM_FIELDS = (
    "status", "wall_s", "rows", "prompt_tokens", "useful_tokens", "useful_tok_s", "total_tok_s",
    "ratio_vs_naive", "mean_batch_fill", "occupancy", "preemptions", "prefix_cache_hit_tokens",
    "peak_rss_mib", "gpu_peak_allocated_mib", "roofline_efficiency_pct",
)


def engine_importable() -> bool:
    try:
        from engine import LLM  # noqa: F401
    except ImportError:
        return False
    return True


def run_quick_bench(tmp: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`bench.py --quick` with args in tmp: its JSON report and its stderr table."""
    out = tmp / "bench.json"
    # One thread per process: on a shared two-core machine, two spinning OpenMP threads
    # stall badly whenever another process holds a core, and these tests only check fields.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--cache-dir", str(tmp / "models"), *args,
         "--out", str(out)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict[str, Any], str]:
    return run_quick_bench(tmp_path_factory.mktemp("bench"), "--quant", "float32,bfloat16,int8")


def test_report_has_every_section(quick_run):
    report, stderr = quick_run
    for key in ("schema", "command", "config", "machine", "model", "workload", "systems",
                "expected_useful_tokens", "useful_tokens_match", "roofline", "quant"):
        assert key in report, key
    assert report["config"]["dtype"] == "float32"
    assert report["workload"]["rows"] == 6
    assert report["expected_useful_tokens"] == report["workload"]["max_tokens"]["sum"]
    assert "useful/s" in stderr  # the table


def test_systems_ran_and_agree_on_useful_tokens(quick_run):
    report, _ = quick_run
    systems = report["systems"]
    assert set(systems) == {"naive", "hf-cb", "engine"}
    assert systems["naive"]["status"] == "ok", systems["naive"]
    assert systems["hf-cb"]["status"] in ("ok", "skipped"), systems["hf-cb"]
    if engine_importable():
        assert systems["engine"]["status"] == "ok", systems["engine"]
    ran = {name: s for name, s in systems.items() if s["status"] == "ok"}
    for name, entry in ran.items():
        for key in SYSTEM_FIELDS:
            assert key in entry, (name, key)
        assert entry["useful_tokens"] == report["expected_useful_tokens"], name
        assert entry["useful_tok_s"] > 0 and entry["total_tok_s"] > entry["useful_tok_s"]
        assert entry["ratio_vs_naive"] > 0, name
        assert entry["peak_rss_mib"] > 0
    assert report["useful_tokens_match"] is True
    assert systems["naive"]["ratio_vs_naive"] == pytest.approx(1.0)
    if "engine" in ran:
        engine = ran["engine"]
        assert 0 < engine["mean_batch_fill"] <= 1 and 0 < engine["occupancy"] <= 1
        assert engine["preemptions"] >= 0 and engine["prefix_cache_hit_tokens"] >= 0
        assert engine["roofline_efficiency_pct"] > 0


def test_roofline_and_quant_axis(quick_run):
    report, _ = quick_run
    roof = report["roofline"]
    assert roof["status"] == "ok", roof
    assert roof["peak_flops"] > 0 and roof["bandwidth_bytes_per_s"] > 0
    assert roof["workload"]["flops"] > roof["workload"]["flops_attention"] > 0
    assert roof["workload"]["kv_bytes"] > 0
    quant = {q["precision"]: q for q in report["quant"]}
    assert list(quant) == ["float32", "bfloat16", "int8"]
    engine = report["systems"]["engine"]
    if engine["status"] == "ok":
        # The run's own dtype reuses the main engine run; the other float dtype runs again
        # with as many KV tokens (blocks), not as many KV bytes.
        own, other = ("float32", "bfloat16") if report["config"]["dtype"] == "float32" else (
            "bfloat16", "float32")
        assert quant[own]["same_run_as"] == "engine"
        assert quant[own]["weight_bytes"] > 0
        assert quant[other]["status"] == "ok", quant[other]
        assert quant[other]["kv_blocks_total"] == engine["kv_blocks_total"]
        assert quant[other]["useful_tokens"] == report["expected_useful_tokens"]
    # int8 may not have landed in the engine yet: then the entry records why, not a crash.
    assert quant["int8"]["status"] in ("ok", "error", "skipped")
    if quant["int8"]["status"] == "ok":
        assert quant["int8"]["useful_tokens"] == report["expected_useful_tokens"]
    else:
        assert quant["int8"].get("error") or quant["int8"].get("note")


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory) -> tuple[dict[str, Any], str]:
    """--quick with the engine alone, constrained to a choice and scored (top 2), two
    interleaved rounds."""
    return run_quick_bench(tmp_path_factory.mktemp("bench-modes"), "--systems", "engine",
                           "--structured", "choice", "--logprobs", "2", "--repeats", "2")


@pytest.mark.skipif(not engine_importable(), reason="engine not importable")
def test_structured_and_logprobs_overhead(modes_run):
    report, stderr = modes_run
    structured, logprobs = report["structured"], report["logprobs"]
    assert structured["status"] == "ok", structured
    assert logprobs["status"] == "ok", logprobs
    for key in ("mode", "spec", "wall_s", "baseline_wall_s", "overhead_pct", "valid_outputs",
                "finished_outputs", "compile_ms"):
        assert key in structured, key
    assert structured["mode"] == "choice" and len(structured["spec"]) == 4
    for section in (structured, logprobs):
        assert section["wall_s"] > 0 and section["baseline_wall_s"] > 0
        assert isinstance(section["overhead_pct"], int | float)
    assert structured["compile_ms"] >= 0
    for section in (structured, logprobs):  # medians of two rounds each
        assert len(section["walls_s"]) == len(section["baseline_walls_s"]) == 2
        assert section["wall_s"] == pytest.approx(statistics.median(section["walls_s"]),
                                                  abs=1e-4)  # the report rounds to 4 places
        assert section["baseline_wall_s"] == pytest.approx(
            statistics.median(section["baseline_walls_s"]), abs=1e-4)
    assert structured["valid_outputs"] == structured["finished_outputs"]
    assert logprobs["k"] == 2 and logprobs["all_tokens_scored"] is True
    # The constrained runs stay out of the cross-system token comparison.
    assert report["systems"]["engine"]["useful_tokens"] == report["expected_useful_tokens"]
    assert report["useful_tokens_match"] is True
    assert "structured choice:" in stderr and "logprobs k=2:" in stderr
