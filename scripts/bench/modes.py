"""--structured and --logprobs: the engine over the same rows with every row constrained
(or scored), against the same engine unconstrained, in one child of their own.

Each pass gets a fresh LLM (same settings, same warmup), so that no pass reads the prefix
cache an earlier pass filled; an untimed priming pass runs first, then the unconstrained
baseline and each mode, interleaved for --repeats rounds, compared by their median walls.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import time
from typing import Any

from scripts.bench.child import Skip, task_settings
from scripts.bench.engine_system import timed_generate
from scripts.bench.workload import Workload, warmup_prompts

STRUCTURED_MODES = ("json", "regex", "choice")
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["label", "count", "note"],
}
REGEX = "[a-z]{3,8}-[0-9]{2,4}"
CHOICES = ["positive", "negative", "neutral", "mixed"]


def spec_of(mode: str) -> dict[str, Any]:
    """The StructuredOutputsParams keyword for a mode (what the report calls the spec)."""
    return {"json": {"json": JSON_SCHEMA}, "regex": {"regex": REGEX},
            "choice": {"choice": CHOICES}}[mode]


def is_valid(mode: str, text: str) -> bool:
    """Whether a finished output satisfies the mode's spec, checked outside the engine."""
    if mode == "json":
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), JSON_SCHEMA)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if mode == "regex":
        return re.fullmatch(REGEX, text) is not None
    return text in CHOICES


def task_modes(task: dict[str, Any]) -> dict[str, Any]:
    """The unconstrained baseline, then each asked-for mode, each on a fresh engine."""
    try:
        from engine import LLM, SamplingParams, StructuredOutputsParams
    except ImportError as exc:
        raise Skip(f"engine not importable: {exc}") from exc
    work = Workload.read(task["workload_file"])
    settings = vars(task_settings(task))

    def timed_pass(extra: dict[str, Any]) -> dict[str, Any]:
        llm = LLM(**settings)
        started = time.perf_counter()
        llm.generate(warmup_prompts(llm.config.vocab_size),
                     SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, **extra))
        warmup_ms = 1000 * (time.perf_counter() - started)
        outputs, wall = timed_generate(llm, work, task["device"], **extra)
        compiler = getattr(getattr(llm, "_constrained", None), "_compiler", None)
        counters = None if compiler is None else {
            "compilations": compiler.compilations, "cache_hits": compiler.cache_hits}
        del llm
        gc.collect()
        if task["device"] == "cuda":
            import torch

            torch.cuda.empty_cache()
        return {"wall_s": wall, "warmup_ms": warmup_ms, "outputs": outputs,
                "generated_tokens": sum(len(o.token_ids) for o in outputs),
                "compiler": counters}

    # A first, untimed pass over the rows: the process's first engine pays for what later
    # ones reuse (kernels for each new shape), which would count against the baseline.
    priming = timed_pass({})
    mode, k = task.get("structured"), task.get("logprobs")
    structured_extra: dict[str, Any] = {}
    compile_ms = 0.0
    if mode:
        started = time.perf_counter()
        # The first build of a spec in this process compiles and checks its grammar.
        structured_extra = {"structured_outputs": StructuredOutputsParams(**spec_of(mode))}
        compile_ms = 1000 * (time.perf_counter() - started)
    # Baseline and modes interleaved, `repeats` rounds: on a shared machine a slow spell
    # then falls on each of them alike, and the medians compare.
    bases, structured_runs, scored_runs = [], [], []
    for _ in range(task.get("repeats") or 1):
        bases.append(timed_pass({}))
        if mode:
            structured_runs.append(timed_pass(structured_extra))
        if k is not None:
            scored_runs.append(timed_pass({"logprobs": k}))
    base = bases[0]
    result: dict[str, Any] = {"status": "ok", "priming_wall_s": priming["wall_s"],
                              "baseline_wall_s": median_wall(bases),
                              "baseline_walls_s": [b["wall_s"] for b in bases],
                              "baseline_generated_tokens": base["generated_tokens"],
                              "baseline_warmup_ms": base["warmup_ms"]}
    if mode:
        run = structured_runs[0]
        finished = [o for o in run["outputs"] if o.finish_reason == "stop"]
        result["structured"] = {
            "mode": mode, "spec": spec_of(mode)[mode], "wall_s": median_wall(structured_runs),
            "walls_s": [r["wall_s"] for r in structured_runs],
            "generated_tokens": run["generated_tokens"],
            "valid_outputs": sum(is_valid(mode, o.text) for o in finished),
            "finished_outputs": len(finished), "rows": len(run["outputs"]),
            "compile_ms": compile_ms,
            # The constrained warmup's extra over the plain one: the tokenizer's grammar
            # tables and the first request's matcher, built on first use.
            "first_use_ms": run["warmup_ms"] - base["warmup_ms"],
            "compiler": run["compiler"],
            "examples": [o.text for o in finished[:3]],
        }
    if k is not None:
        run = scored_runs[0]
        scored = all(o.outputs[0].logprobs is not None
                     and len(o.outputs[0].logprobs) == len(o.token_ids) for o in run["outputs"])
        result["logprobs"] = {"k": k, "wall_s": median_wall(scored_runs),
                              "walls_s": [r["wall_s"] for r in scored_runs],
                              "generated_tokens": run["generated_tokens"],
                              "all_tokens_scored": scored}
    return result


def median_wall(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["wall_s"] for r in runs)


def finish_modes(entry: dict[str, Any] | None, asked: list[str]) -> dict[str, Any]:
    """The report's top-level "structured" and "logprobs" sections (the asked ones) from
    the child's result."""
    if entry is None:
        return {}
    if entry.get("status") != "ok":
        failed = {"status": entry.get("status"), "error": entry.get("error") or entry.get("note")}
        return {key: dict(failed) for key in asked}
    base = entry["baseline_wall_s"]
    base_tokens = entry["baseline_generated_tokens"]
    out = {}
    for key in ("structured", "logprobs"):
        if key not in entry:
            continue
        section = dict(entry[key])
        wall = section["wall_s"]
        per_token = (wall / section["generated_tokens"]) / (base / base_tokens) \
            if section["generated_tokens"] and base_tokens else None
        section.update(
            status="ok", wall_s=round(wall, 4), baseline_wall_s=round(base, 4),
            baseline_walls_s=entry.get("baseline_walls_s"),
            overhead_pct=round(100 * (wall / base - 1), 2),
            baseline_generated_tokens=base_tokens,
            # Constrained rows stop once complete: per token is the fairer comparison.
            per_token_overhead_pct=None if per_token is None else round(100 * (per_token - 1), 2),
        )
        for name in ("compile_ms", "first_use_ms"):
            if name in section:
                section[name] = round(section[name], 3)
        out[key] = section
    return out
