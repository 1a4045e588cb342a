"""llama.cpp as a system (`--systems ...,llama.cpp`), through llama-cpp-python, on the run's
weights converted to GGUF (scripts/bench/gguf_export.py), run in a child per format.

`llama.cpp` expands to one system per format: the run's float dtype (bf16 for bfloat16),
Q8_0, and Q4_0 when --quant compares an int4 scheme. Every format runs the run's rows
(same prompt ids, each row's own max tokens, EOS ignored), greedy, batched by
llama_cpp_runner. Needs the optional extra: pip install -e '.[bench-llama-cpp]' (built
with CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU's instructions); without it the entries
are skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from scripts.bench.child import Skip, task_settings
from scripts.bench.gguf_export import FLOAT_FORMATS, ensure_gguf
from scripts.bench.workload import Workload, warmup_prompts

NAME = "llama.cpp"


def expand(systems: list[str], dtype: str, quant: list[str]) -> list[str]:
    """The system list with "llama.cpp" replaced by one "llama.cpp FORMAT" per format."""
    formats = [FLOAT_FORMATS[dtype], "q8_0"]
    if any(q.startswith("int4") for q in quant):
        formats.append("q4_0")
    out: list[str] = []
    for name in systems:
        out += [f"{NAME} {fmt}" for fmt in formats] if name == NAME else [name]
    return out


def task_llama_cpp(task: dict[str, Any]) -> dict[str, Any]:
    """Export (once, cached) and load the format's GGUF, warm up, then time the rows."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise Skip(f"{exc.name} not installed: pip install -e '.[bench-llama-cpp]'") from exc
    from scripts.bench.llama_cpp_runner import LlamaCppRunner

    settings = task_settings(task)
    work = Workload.read(task["workload_file"])
    threads = task.get("threads") or os.cpu_count() or 1
    try:
        path = ensure_gguf(Path(settings.model), Path(task["gguf_dir"]), task["gguf_format"],
                           threads)
    except ValueError as exc:  # a model the exporter does not cover
        raise Skip(str(exc)) from exc
    rows = [len(p) + n for p, n in zip(work.prompts, work.max_tokens, strict=True)]
    with LlamaCppRunner(path, n_seq_max=min(settings.max_num_seqs, len(rows)),
                        n_ctx_seq=max(rows), n_batch=settings.max_num_batched_tokens,
                        threads=threads) as runner:
        runner.generate(warmup_prompts(runner.n_vocab), [2, 2])
        steps_before = runner.steps
        started = time.perf_counter()
        outputs = runner.generate(work.prompts, work.max_tokens)
        wall = time.perf_counter() - started
        n_seq_max, steps = runner.n_seq_max, runner.steps - steps_before
    useful = sum(min(len(o), n) for o, n in zip(outputs, work.max_tokens, strict=True))
    return {"status": "ok", "wall_s": wall, "useful_tokens": useful, "steps": steps,
            "gguf": str(path), "gguf_bytes": path.stat().st_size,
            "matmul_weight_bytes": matmul_bytes(path), "threads": threads,
            "n_seq_max": n_seq_max, "llama_cpp_python": llama_cpp_version(),
            "note": f"{task['gguf_format']} GGUF, {n_seq_max} sequences, flash attention, "
                    f"{threads} threads"}


def matmul_bytes(path: Path) -> int:
    """Bytes of the weights a step reads: every tensor of the file but the embedding table,
    at its stored (quantized) size, for the roofline."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


def llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)
