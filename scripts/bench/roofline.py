"""The roofline: this machine's measured matmul FLOP/s and memory bandwidth (in a child),
the workload's FLOPs and bytes, and the lower bound on wall time they give."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import EngineConfig
from engine.config import ModelConfig
from scripts.bench import log
from scripts.bench.child import run_child, synchronize
from scripts.bench.sizes import (
    MIB,
    dtype_bytes,
    embed_params,
    head_params,
    layer_params,
    matmul_weight_bytes,
)
from scripts.bench.workload import Workload


def measure_peaks(settings: EngineConfig, model: ModelConfig, rows: int,
                  quick: bool) -> dict[str, Any]:
    """Matmul FLOP/s at the engine's step shapes (a full token budget, and the decode rows
    of a full batch) and read bandwidth, in a child of their own."""
    log("measuring matmul throughput and memory bandwidth ...")
    device = str(settings.device)
    return run_child({
        "kind": "peaks", "device": device, "dtype": str(settings.dtype),
        "hidden": model.hidden_size, "intermediate": model.intermediate_size,
        "tokens": settings.max_num_batched_tokens,
        "decode_tokens": min(settings.max_num_seqs, rows),
        "bandwidth_bytes": (256 if quick else 1024) * MIB * (4 if device == "cuda" else 1),
        "min_seconds": 0.1 if quick else 0.5,
    })


def task_peaks(task: dict[str, Any]) -> dict[str, Any]:
    """The child's side of measure_peaks."""
    device, dtype = task["device"], getattr(torch, task["dtype"])
    hidden, inter = task["hidden"], task["intermediate"]

    def timed(fn: Callable[[], Any], min_seconds: float) -> float:
        fn()  # warm up (allocations, kernel selection)
        synchronize(device)
        reps, started = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return elapsed / reps

    def matmul_flops(tokens: int, dtype: Any) -> float:
        a = torch.randn(tokens, hidden, device=device, dtype=dtype)
        b = torch.randn(hidden, inter, device=device, dtype=dtype)
        return 2 * tokens * hidden * inter / timed(lambda: torch.matmul(a, b), task["min_seconds"])

    def best_matmul(tokens: int) -> tuple[float, str]:
        """FLOP/s of the faster of the dtype's own kernels and float32 (which the engine
        uses on CPUs without bf16/fp16 instructions, engine.device.cpu_matmul_upcasts):
        the bound must be the best path."""
        paths = {"native": matmul_flops(tokens, dtype)}
        if dtype != torch.float32:
            paths["float32"] = matmul_flops(tokens, torch.float32)
        path = max(paths, key=paths.__getitem__)
        return paths[path], path

    # Summing float32 reads every byte once; the result is one number, so writes are nil.
    big = torch.ones(task["bandwidth_bytes"] // 4, device=device, dtype=torch.float32)
    bandwidth = task["bandwidth_bytes"] / timed(big.sum, task["min_seconds"])
    peak, peak_path = best_matmul(task["tokens"])
    decode, decode_path = best_matmul(task["decode_tokens"])
    return {
        "status": "ok", "matmul_tokens": task["tokens"],
        "matmul_shape": f"[{task['tokens']},{hidden}]x[{hidden},{inter}] {task['dtype']}",
        "peak_flops": peak, "matmul_path": peak_path,
        "decode_matmul_flops": decode, "decode_matmul_path": decode_path,
        "bandwidth_bytes_per_s": bandwidth, "bandwidth_tensor_bytes": task["bandwidth_bytes"],
    }


def workload_costs(model: ModelConfig, work: Workload, kv_token_bytes: int) -> dict[str, float]:
    """FLOPs and KV traffic of the useful work, independent of any system's schedule.

    Per row with prompt P and G generated tokens, P+G-1 tokens go through the layers (the
    last sampled token is never fed back) and G rows of logits are computed. A token at
    position i attends to i+1 keys: 4*heads*head_dim*(i+1) FLOPs per layer. Decoding the
    token at position i reads the i+1 cached K/V entries; every fed token writes one.
    """
    fed = [len(p) + g - 1 for p, g in zip(work.prompts, work.max_tokens, strict=True)]
    attn_pairs = sum(triangle(n) for n in fed)
    linear = 2 * layer_params(model) * sum(fed) + 2 * head_params(model) * work.useful_tokens
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * attn_pairs
    # Decode tokens sit at positions P .. P+G-2 and read 1+position entries each.
    decode_reads = sum(
        triangle(len(p) + g - 1) - triangle(len(p))
        for p, g in zip(work.prompts, work.max_tokens, strict=True)
    )
    return {
        "fed_tokens": sum(fed), "flops_linear": linear, "flops_attention": attention,
        "flops": linear + attention,
        "kv_bytes": (decode_reads + sum(fed)) * kv_token_bytes,
        "flops_per_cached_token": 2 * layer_params(model),
    }


def triangle(n: int) -> int:
    """1 + 2 + ... + n."""
    return n * (n + 1) // 2


def roofline_bound(costs: dict[str, float], peaks: dict[str, Any], steps: int | None,
                   weight_bytes: float, cached_tokens: int | None) -> float | None:
    """max(FLOPs / peak FLOP/s, bytes / bandwidth), with the weights read once per step.

    A single max over the whole run is optimistic (a real run is compute-bound in prefill
    steps and memory-bound in decode steps), so this is a lower bound on wall time.
    Prompt tokens served from a prefix cache need no layer FLOPs and are taken off.
    """
    if not steps or peaks.get("status") != "ok":
        return None
    flops = costs["flops"] - (cached_tokens or 0) * costs["flops_per_cached_token"]
    moved = steps * weight_bytes + costs["kv_bytes"]
    return max(flops / peaks["peak_flops"], moved / peaks["bandwidth_bytes_per_s"])


def system_bound(entry: dict[str, Any], costs: dict[str, float], peaks: dict[str, Any],
                 model: ModelConfig, dtype: str) -> float | None:
    """The bound at one system's own step count, its weights and its KV dtype."""
    # A step reads every weight but the embedding table, of which it gathers a few rows;
    # the engine's own weight_bytes counts int8/int4 weights at their packed size.
    entry_dtype = entry.get("dtype", dtype)
    weights = matmul_weight_bytes(model, dtype)
    if entry.get("weight_bytes"):
        weights = entry["weight_bytes"] - embed_params(model) * dtype_bytes(entry_dtype)
    if entry.get("matmul_weight_bytes"):  # llama.cpp: its GGUF's own (quantized) tensors
        weights = entry["matmul_weight_bytes"]
    if entry_dtype != dtype:  # a float entry of the quant axis: its KV has its own size
        kv_scale = dtype_bytes(entry_dtype) / dtype_bytes(dtype)
        costs = {**costs, "kv_bytes": costs["kv_bytes"] * kv_scale}
    return roofline_bound(costs, peaks, entry.get("steps"), weights,
                          entry.get("prefix_cache_hit_tokens"))


def ideal_bound(costs: dict[str, float], peaks: dict[str, Any], work: Workload,
                max_num_batched_tokens: int, weight_bytes: int) -> dict[str, Any]:
    """The bound for the fewest steps any schedule could take: the longest row's decode
    steps, or as many full token budgets as the fed tokens need. A system's own bound
    (roofline_bound_s) uses its own step count, so a system that takes many small steps
    (naive) gets a looser bound than this one."""
    steps = max(max(work.max_tokens), math.ceil(costs["fed_tokens"] / max_num_batched_tokens))
    bound = roofline_bound(costs, peaks, steps, weight_bytes, None)
    return {"min_steps": steps, "min_steps_bound_s": None if bound is None else round(bound, 6)}
