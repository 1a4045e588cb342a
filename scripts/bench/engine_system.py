"""The engine as a system (engine and engine-eager), run in a child."""

from __future__ import annotations

import time
from typing import Any

from scripts.bench.child import Skip, synchronize, task_settings
from scripts.bench.workload import Workload, warmup_prompts


def task_engine(task: dict[str, Any]) -> dict[str, Any]:
    """`LLM.generate` over the rows, greedy, each row's own max_tokens, EOS ignored."""
    try:
        from engine import LLM, SamplingParams
    except ImportError as exc:
        raise Skip(f"engine not importable: {exc}") from exc
    work = Workload.read(task["workload_file"])
    llm = LLM(**vars(task_settings(task)))
    llm.generate(warmup_prompts(llm.config.vocab_size),
                 SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    before = llm.stats()
    outputs, wall = timed_generate(llm, work, task["device"])
    useful = sum(min(len(o.token_ids), n) for o, n in zip(outputs, work.max_tokens, strict=True))
    return {"status": "ok", "wall_s": wall, "useful_tokens": useful,
            **engine_stats_delta(before, llm.stats())}


def timed_generate(llm: Any, work: Any, device: str, **extra: Any) -> tuple[list, float]:
    """The workload's rows through llm, greedy, each to its max_tokens (extra: more
    SamplingParams fields): the outputs and the wall seconds; a failed row raises."""
    from engine import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **extra)
              for n in work.max_tokens]
    synchronize(device)
    started = time.perf_counter()
    outputs = llm.generate(work.prompts, params)
    synchronize(device)
    wall = time.perf_counter() - started
    failed = [o.error for o in outputs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, e.g. {failed[0]}")
    return outputs, wall


def engine_stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The timed run's share of the engine's cumulative counters (the warmup is left out)."""
    def delta(key: str) -> Any:
        if not isinstance(after.get(key), int | float):
            return None
        return after[key] - before.get(key, 0)

    steps, scheduled = delta("steps"), delta("scheduled_tokens")
    budget = after.get("token_budget")
    fill = after.get("token_budget_fill")
    if steps and scheduled is not None and budget:
        fill = scheduled / (steps * budget)
    seqs, slots = delta("scheduled_seqs"), after.get("max_num_seqs")
    occupancy = seqs / (steps * slots) if steps and seqs is not None and slots else None
    return {
        "steps": steps, "mean_batch_fill": fill, "occupancy": occupancy,
        "preemptions": delta("preemptions"),
        "prefix_cache_hit_tokens": delta("prefix_cache_hit_tokens"),
        "weight_bytes": after.get("weight_bytes"), "kv_blocks_total": after.get("kv_blocks_total"),
        "engine_stats": after,
    }
