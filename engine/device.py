"""Choosing the device, the dtype and the KV cache size from user settings and the machine."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
CPU_KV_CACHE_CAP = 4 * 2**30
CPU_KV_CACHE_FRACTION = 0.25  # of the memory available now
CUDA_MEMORY_FRACTION = 0.9  # of the free GPU memory after the weights are loaded


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 where it is fast (CUDA, CPUs with bf16 instructions), else float32."""
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_matmul_upcasts(dtype: torch.dtype) -> bool:
    """Whether CPU matmuls in `dtype` should run in float32 over the same values.

    Without bf16/fp16 instructions torch emulates half-precision GEMMs, several times
    slower than converting to float32 and back. The float32 product of half-precision
    values, rounded once, is what a native half-precision GEMM with float32 accumulation
    returns.
    """
    if dtype == torch.bfloat16:
        return not cpu_has_bf16()
    if dtype == torch.float16:
        return not cpu_flags() & {"avx512_fp16", "amx_fp16"}
    return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on ARM)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def parse_memory_size(value: int | str) -> int:
    """Bytes from an int or a string like "4GiB", "512MiB", "1.5GB", "1000000"."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"invalid memory size {value!r}; e.g. 4GiB, 512MiB or a byte count")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def auto_kv_cache_bytes(device: torch.device, reserved_bytes: int, gather_fraction: float) -> int:
    """Memory for the KV pool when kv_cache_memory="auto".

    reserved_bytes: activations of one step, kept free next to the pool.
    gather_fraction: extra memory per pool byte that attention needs transiently (the
    portable backend gathers one layer's KV of the running sequences).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        usable = CUDA_MEMORY_FRACTION * free - reserved_bytes
    else:
        usable = min(CPU_KV_CACHE_FRACTION * _available_ram(), CPU_KV_CACHE_CAP)
    return max(0, int(usable / (1 + gather_fraction)))


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX-INT8), which make
    torch's int8 x int8 matmul (`torch._int_mm`) faster than its weight-only int8 op."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
