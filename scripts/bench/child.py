"""The child-process protocol: every system, the model build and the peak measurement run
in a fresh interpreter, `bench.py --child TASK_FILE`.

A task is a JSON object with a "kind" (which task function runs), "device", and a
"result_file" the child writes its result object to; systems also get "workload_file" and
"engine" (the run's EngineConfig as a dict). A result has "status" ("ok", "skipped" or
"error") and the child's peak memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from engine import EngineConfig
from scripts.bench.sizes import MIB

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = REPO_ROOT / "scripts" / "bench.py"

Task = Callable[[dict[str, Any]], dict[str, Any]]


class Skip(Exception):
    """The system is not available here (not installed, too old): reported, not an error."""


def run_child(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in a fresh interpreter and return its result dict.

    A fresh process per system keeps peak RSS and GPU memory per system, and frees the GPU
    between systems (the engine and hf-cb size their KV caches from free memory).
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        task_file, result_file = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_file.write_text(json.dumps({**task, "result_file": str(result_file)}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        # The child's stdout goes to our stderr (fd 2): our stdout carries only the JSON.
        proc = subprocess.run([sys.executable, str(ENTRY_POINT), "--child", str(task_file)],
                              stdout=2, env=env, check=False)
        if result_file.is_file():
            return json.loads(result_file.read_text())
        return {"status": "error", "error": f"child exited with code {proc.returncode}"}


def serve(task_file: str, tasks: Mapping[str, Task]) -> None:
    """The child's side: run the task file's task, write its result, never raise."""
    task = json.loads(Path(task_file).read_text())
    try:
        result = tasks[task["kind"]](task)
    except Skip as exc:
        result = {"status": "skipped", "note": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    result.update(peak_memory(task.get("device", "cpu")))
    result["torch_threads"] = torch.get_num_threads()
    Path(task["result_file"]).write_text(json.dumps(result))


def task_settings(task: dict[str, Any]) -> EngineConfig:
    """The run's engine settings, which the HF baselines share (model, dtype, batch limits)."""
    return EngineConfig(**task["engine"])


def peak_memory(device: str) -> dict[str, float | None]:
    """This process's peak RSS (ru_maxrss is KiB on Linux) and, on CUDA, peak GPU memory."""
    out: dict[str, float | None] = {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gpu_peak_allocated_mib": None, "gpu_peak_reserved_mib": None,
    }
    if device == "cuda" and torch.cuda.is_initialized():
        out["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        out["gpu_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
    return out


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer stopped next counts all of it."""
    if device == "cuda":
        torch.cuda.synchronize()
