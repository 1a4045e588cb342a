"""One benchmark run: the model and the rows, then the roofline peaks and each system in a
child process of its own, then the report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from engine import EngineConfig
from engine.config import ModelConfig, load_model_config
from engine.device import CPU_KV_CACHE_CAP, resolve_device, resolve_dtype
from scripts.bench import (
    engine_system,
    gguf_export,
    hf_baselines,
    llama_cpp_system,
    log,
    modes,
    random_model,
    roofline,
)
from scripts.bench.child import Task, run_child, serve
from scripts.bench.cli import FLOAT_PRECISIONS, build_parser, finish_args
from scripts.bench.report import build_report, fmt, print_table, write_json
from scripts.bench.sizes import MIB, dtype_bytes, kv_budget, kv_bytes_per_token
from scripts.bench.workload import Workload, parquet_workload, random_workload

CHILD_TASKS: dict[str, Task] = {
    "build": random_model.task_build, "peaks": roofline.task_peaks,
    "naive": hf_baselines.task_naive, "hf-cb": hf_baselines.task_hf_cb,
    "engine": engine_system.task_engine, "engine-eager": engine_system.task_engine,
    "engine-modes": modes.task_modes, llama_cpp_system.NAME: llama_cpp_system.task_llama_cpp,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        serve(args.child, CHILD_TASKS)
        return 0
    try:
        args = finish_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # one line on stderr, exit code 2
    if args.threads:  # before any child starts (this process runs no torch ops of its own)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)
    device, dtype = resolve_device_dtype(args)
    # Absolute: HF reads a relative path that is not a folder as a hub repo id.
    if args.model:
        model_dir = Path(args.model).resolve()
    else:
        model_dir = random_model.random_model_dir(args, dtype, device).resolve()
    model = model_config(model_dir)
    work = (parquet_workload if args.parquet else random_workload)(args, model_dir, model)
    try:
        settings = engine_settings(args, model_dir, device, dtype,
                                   default_kv_bytes(args, device, model, work, dtype))
    except ValueError as exc:
        parser.error(str(exc))

    with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
        workload_file = Path(tmp) / "workload.json"
        work.write(workload_file)
        base = {"device": device, "workload_file": str(workload_file),
                "naive_batch": args.naive_batch, "threads": args.threads,
                "gguf_dir": str(gguf_export.cache_dir_for(args.cache_dir, model_dir))}
        peaks = roofline.measure_peaks(settings, model, len(work.prompts), args.quick)
        names = llama_cpp_system.expand(args.systems, dtype, args.quant)
        systems = run_systems(names, base, settings)
        quant = run_quant_axis(args.quant, base, settings, systems)
        extra = run_modes(args, base, settings)

    report = build_report(args, settings, model, work, peaks, systems, quant)
    report.update(extra)
    report["machine"]["load_average_1m_at_start"] = load_at_start
    write_json(report, args.out)
    print_table(report)
    return 0


def resolve_device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """The engine's own choice of device and of dtype ("auto"), by name, for every system."""
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"bench.py: error: {exc}") from None
    return device.type, str(resolve_dtype(args.dtype, device)).removeprefix("torch.")


def model_config(model_dir: Path) -> ModelConfig:
    """The model as the engine reads it, which the workload and the roofline are sized by."""
    try:
        return load_model_config(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"bench.py: error: {exc}") from None


def default_kv_bytes(args: argparse.Namespace, device: str, model: ModelConfig, work: Workload,
                     dtype: str) -> int | None:
    """One KV budget for engine and hf-cb. On CPU, 'auto' in HF means most of the RAM that
    other people share with us, so we size it for the whole workload, at most the engine's
    own CPU cap (4 GiB)."""
    if args.kv_cache_gib is not None:
        return int(args.kv_cache_gib * 1024**3)
    if device == "cuda":
        return None
    total = (work.prompt_tokens + work.useful_tokens) * kv_bytes_per_token(model, dtype)
    return min(CPU_KV_CACHE_CAP, max(64 * MIB, total))


def engine_settings(args: argparse.Namespace, model_dir: Path, device: str, dtype: str,
                    kv_bytes: int | None) -> EngineConfig:
    """The engine's settings for this run; hf-cb takes its limits from the same."""
    return EngineConfig(
        model=str(model_dir), dtype=dtype, device=device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory="auto" if kv_bytes is None else kv_bytes,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        block_size=args.block_size,
    )


def system_task(name: str, base: dict[str, Any], settings: EngineConfig) -> dict[str, Any]:
    if name == "engine-eager":
        settings = dataclasses.replace(settings, enforce_eager=True)
    task = {**base, "kind": name, "engine": dataclasses.asdict(settings)}
    system, _, fmt = name.partition(" ")
    if system == llama_cpp_system.NAME:  # "llama.cpp q8_0": one task kind, the format apart
        task.update(kind=system, gguf_format=fmt)
    return task


def run_systems(names: list[str], base: dict[str, Any],
                settings: EngineConfig) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        log(f"running {name} ...")
        result = results[name] = run_child(system_task(name, base, settings))
        # A line per system as it finishes, so a run cut short still tells something.
        log(f"  {name}: {result.get('status')} {fmt(result.get('wall_s'), '.2f')} s, "
            f"{fmt(result.get('useful_tokens'), 'd')} useful tokens "
            f"{result.get('error') or ''}")
    return results


def run_quant_axis(precisions: list[str], base: dict[str, Any], settings: EngineConfig,
                   systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine once per listed precision; int8/int4 keep the run's float dtype."""
    run_dtype = str(settings.dtype)
    entries = []
    for precision in precisions:
        quant = None if precision in FLOAT_PRECISIONS else precision
        dtype = run_dtype if quant else precision
        if quant is None and dtype == run_dtype and "engine" in systems:
            entry = {**systems["engine"], "same_run_as": "engine"}
        else:
            log(f"running engine at {precision} ...")
            # The run's KV capacity in tokens, not in bytes: float32 takes twice bfloat16's.
            kv_bytes = kv_budget(settings)
            if kv_bytes is not None:
                kv_bytes = kv_bytes * dtype_bytes(dtype) // dtype_bytes(run_dtype)
            precise = dataclasses.replace(
                settings, dtype=dtype, quantization=quant,
                kv_cache_memory="auto" if kv_bytes is None else kv_bytes,
            )
            entry = run_child(system_task("engine", base, precise))
        entries.append({"precision": precision, "dtype": dtype, "quantization": quant, **entry})
    return entries


def run_modes(args: argparse.Namespace, base: dict[str, Any],
              settings: EngineConfig) -> dict[str, Any]:
    """--structured / --logprobs: the report's "structured" and "logprobs" sections."""
    asked = [key for key, on in (("structured", args.structured),
                                 ("logprobs", args.logprobs is not None)) if on]
    if not asked:
        return {}
    log(f"running engine {' and '.join(asked)} against engine unconstrained ...")
    task = {**system_task("engine", base, settings), "kind": "engine-modes",
            "structured": args.structured, "logprobs": args.logprobs,
            "repeats": args.repeats}
    result = modes.finish_modes(run_child(task), asked)
    for key, section in result.items():
        log(f"  {key}: {section.get('status')} {fmt(section.get('wall_s'), '.2f')} s vs "
            f"{fmt(section.get('baseline_wall_s'), '.2f')} s {section.get('error') or ''}")
    return result
