"""--random-model: a random-weight model of a make_tiny_model shape, built once per
settings in a child and kept under --cache-dir."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.random_model import SHAPES, make_tiny_model
from scripts.bench import log
from scripts.bench.child import run_child


def context_needed(args: argparse.Namespace) -> int:
    """Context a random model needs for the longest possible row, rounded up to a power of two."""
    longest = args.prompt_len[1] + args.max_tokens[1]
    if args.shared_prefix_frac > 0:
        longest += args.shared_prefix_len
    return max(512, 1 << math.ceil(math.log2(longest)))


def random_model_dir(args: argparse.Namespace, dtype: str, device: str) -> Path:
    """The cached random model folder for these settings, built (in a child) when missing."""
    context = context_needed(args)
    name = f"{args.arch}-{args.random_model}-{dtype}-seed{args.seed}-ctx{context}"
    out = Path(args.cache_dir) / name
    # make_tiny_model writes batchinfer-tiny.json last, and we rename the finished folder in.
    if (out / "batchinfer-tiny.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    log(f"building random {args.arch} model '{args.random_model}' ({dtype}) on {device} ...")
    started = time.perf_counter()
    result = run_child({
        "kind": "build", "out": str(tmp), "arch": args.arch, "shape": args.random_model,
        "seed": args.seed, "dtype": dtype, "device": device, "context": context,
    })
    if result.get("status") != "ok":
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"bench.py: error: building the model failed: {result.get('error')}")
    try:
        os.replace(tmp, out)
    except OSError:  # another run finished the same model first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {out} in {time.perf_counter() - started:.1f}s")
    return out


@contextmanager
def default_tensor_type(device: str, dtype: str) -> Iterator[None]:
    """Create tensors straight on `device` in `dtype`. Built this way on an H200, llama3-8b
    took 39 s including writing 16 GB of safetensors; in float32 on a CPU it would need
    32 GB of RAM before the cast to bfloat16, and minutes of single-threaded init."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(saved)


def task_build(task: dict[str, Any]) -> dict[str, Any]:
    """The child's side of random_model_dir."""
    # The shape's own vocab: make_tiny_model would otherwise shrink it to its small trained
    # tokenizer (~1.5k), cutting 'small' from ~134M to ~87M params and the LM head with it.
    # Random ids above the tokenizer's range decode to nothing, which a benchmark can ignore.
    with default_tensor_type(task["device"], task["dtype"]):
        make_tiny_model(
            task["out"], arch=task["arch"], shape=task["shape"], seed=task["seed"],
            dtype=task["dtype"], vocab_size=SHAPES[task["shape"]]["vocab_size"],
            max_position_embeddings=task["context"],
        )
    return {"status": "ok"}
