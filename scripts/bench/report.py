"""The report: each system's derived rates, the JSON document, and the table on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from engine import EngineConfig
from engine.config import ModelConfig
from engine.device import cpu_has_bf16
from scripts.bench import log
from scripts.bench.roofline import ideal_bound, system_bound, workload_costs
from scripts.bench.sizes import (
    MIB,
    kv_budget,
    kv_bytes_per_token,
    matmul_weight_bytes,
    model_summary,
)
from scripts.bench.workload import Workload

SCHEMA = "batchinfer.bench/1"


def build_report(args: argparse.Namespace, settings: EngineConfig, model: ModelConfig,
                 work: Workload, peaks: dict[str, Any], systems: dict[str, dict[str, Any]],
                 quant: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document; finishes each system's entry in place."""
    device, dtype = str(settings.device), str(settings.dtype)
    costs = workload_costs(model, work, kv_bytes_per_token(model, dtype))
    naive = systems.get("naive", {})
    naive_rate = naive["useful_tokens"] / naive["wall_s"] if naive.get("status") == "ok" else None
    for entry in [*systems.values(), *quant]:
        finish_system(entry, work, naive_rate, system_bound(entry, costs, peaks, model, dtype))
    ran = [e["useful_tokens"] for e in [*systems.values(), *quant] if e.get("status") == "ok"]
    weight_bytes = matmul_weight_bytes(model, dtype)
    return {
        "schema": SCHEMA,
        "command": [sys.executable, *sys.argv],
        "config": {
            "model": settings.model, "random_model": args.random_model, "arch": args.arch,
            "dtype": dtype, "device": device, "seed": settings.seed, "rows": len(work.prompts),
            "prompt_len": list(args.prompt_len), "max_tokens": list(args.max_tokens),
            "shared_prefix_frac": args.shared_prefix_frac,
            "shared_prefix_len": args.shared_prefix_len, "parquet": args.parquet,
            "naive_batch": args.naive_batch, "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "kv_cache_bytes": kv_budget(settings), "prefix_caching": settings.enable_prefix_caching,
            "block_size": settings.block_size,
            "systems": args.systems, "quant": args.quant, "quick": args.quick,
            "structured": args.structured, "logprobs": args.logprobs, "repeats": args.repeats,
        },
        "machine": machine_info(device),
        "model": model_summary(model),
        "workload": work.summary(),
        "systems": systems,
        "expected_useful_tokens": work.useful_tokens,
        "useful_tokens_match": bool(ran) and all(n == work.useful_tokens for n in ran),
        "roofline": {**peaks, "workload": costs, "matmul_weight_bytes": weight_bytes,
                     **ideal_bound(costs, peaks, work, settings.max_num_batched_tokens,
                                   weight_bytes)},
        "quant": quant,
    }


def finish_system(entry: dict[str, Any], work: Workload, naive_rate: float | None,
                  bound: float | None) -> dict[str, Any]:
    """Derived rates for one system's raw result (rounded: the JSON is read by people too)."""
    if entry.get("status") != "ok":
        return entry
    wall = entry["wall_s"]
    rate = entry["useful_tokens"] / wall

    def r(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    entry.update(
        wall_s=round(wall, 4), rows=len(work.prompts), prompt_tokens=work.prompt_tokens,
        useful_tok_s=r(rate, 2),
        total_tok_s=r((entry["useful_tokens"] + work.prompt_tokens) / wall, 2),
        ratio_vs_naive=r(rate / naive_rate, 3) if naive_rate else None,
        roofline_bound_s=r(bound, 6),
        roofline_efficiency_pct=r(100 * bound / wall, 2) if bound else None,
        wall_pct_of_bound=r(100 * wall / bound, 1) if bound else None,
        mean_batch_fill=r(entry.get("mean_batch_fill"), 4),
        occupancy=r(entry.get("occupancy"), 4),
    )
    for key in ("preemptions", "prefix_cache_hit_tokens", "steps"):
        entry.setdefault(key, None)
    return entry


def machine_info(device: str) -> dict[str, Any]:
    import transformers  # here: the children that import this module need not load it

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Other people's load on a shared machine skews every number: keep it on record.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "cpu_fast_bf16": cpu_has_bf16(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0],
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(report: dict[str, Any], out: str | None) -> None:
    """To --out, or else stdout, which carries nothing else."""
    text = json.dumps(report, indent=2, default=str)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def print_table(report: dict[str, Any]) -> None:
    work, cfg = report["workload"], report["config"]
    log("")
    log(f"model {cfg['model']}  {report['model']['params'] / 1e6:.1f}M params  {cfg['dtype']} "
        f"on {cfg['device']}  rows {work['rows']}  prompt tokens {work['prompt_tokens']}  "
        f"useful tokens {report['expected_useful_tokens']}")
    head = (f"{'system':<16}{'status':>8}{'wall s':>9}{'useful/s':>10}{'total/s':>10}"
            f"{'x naive':>8}{'occ':>6}{'budget':>7}{'RSS MiB':>9}{'GPU MiB':>9}{'preempt':>8}"
            f"{'prefix':>8}{'roof%':>7}")
    log(head)
    log("-" * len(head))
    rows = [(name, entry) for name, entry in report["systems"].items()]
    rows += [(f"engine {q['precision']}", q) for q in report["quant"]]
    for name, e in rows:
        log(f"{name:<16}{e.get('status', '?'):>8}{fmt(e.get('wall_s'), '.2f'):>9}"
            f"{fmt(e.get('useful_tok_s')):>10}{fmt(e.get('total_tok_s')):>10}"
            f"{fmt(e.get('ratio_vs_naive'), '.2f'):>8}{fmt(e.get('occupancy'), '.3f'):>6}"
            f"{fmt(e.get('mean_batch_fill'), '.3f'):>7}"
            f"{fmt(e.get('peak_rss_mib'), '.0f'):>9}{fmt(e.get('gpu_peak_reserved_mib'), '.0f'):>9}"
            f"{fmt(e.get('preemptions'), 'd'):>8}{fmt(e.get('prefix_cache_hit_tokens'), 'd'):>8}"
            f"{fmt(e.get('roofline_efficiency_pct')):>7}")
        if e.get("status") != "ok":
            log(f"{'':<16}{e.get('error') or e.get('note')}")
        elif e.get("weight_bytes") and name.startswith("engine "):
            log(f"{'':<16}weights {e['weight_bytes'] / MIB:.1f} MiB")
        elif e.get("gguf_bytes"):
            log(f"{'':<16}GGUF {e['gguf_bytes'] / MIB:.1f} MiB; {e.get('note')}")
    roof = report["roofline"]
    if roof.get("status") == "ok":
        cost = roof["workload"]
        log(f"roofline: {roof['peak_flops'] / 1e12:.2f} TFLOP/s at {roof['matmul_shape']} "
            f"via {roof['matmul_path']} ({roof['decode_matmul_flops'] / 1e12:.2f} at decode "
            f"rows via {roof['decode_matmul_path']}), "
            f"{roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read")
        log(f"  workload {cost['flops'] / 1e12:.2f} TFLOP, KV traffic {cost['kv_bytes'] / 1e9:.2f} "
            f"GB; bound {fmt(roof['min_steps_bound_s'], '.3f')} s at the fewest possible steps "
            f"({roof['min_steps']}); roof% = bound at the system's own steps / its wall time")
    print_modes(report)
    log(f"useful tokens match across systems: {report['useful_tokens_match']}")


def print_modes(report: dict[str, Any]) -> None:
    """A line each for --structured and --logprobs: overhead against the engine unconstrained
    (constrained rows stop once complete, so per token is shown too)."""
    for key, label in (("structured", "structured"), ("logprobs", "logprobs")):
        e = report.get(key)
        if e is None:
            continue
        if e.get("status") != "ok":
            log(f"{label}: {e.get('status')} {e.get('error') or ''}")
            continue
        what = f"{e['mode']}" if key == "structured" else f"k={e['k']}"
        line = (f"{label} {what}: {e['wall_s']:.2f} s vs unconstrained "
                f"{e['baseline_wall_s']:.2f} s, overhead {e['overhead_pct']:+.1f}% "
                f"({fmt(e.get('per_token_overhead_pct'), '+.1f')}% per token)")
        rounds = len(e.get("walls_s") or [])
        if rounds > 1:
            line += f", medians of {rounds} interleaved rounds"
        if key == "structured":
            line += (f"; valid {e['valid_outputs']}/{e['finished_outputs']} finished of "
                     f"{e['rows']} rows; compile {e['compile_ms']:.1f} ms, first use "
                     f"{e['first_use_ms']:.1f} ms")
        log(line)
