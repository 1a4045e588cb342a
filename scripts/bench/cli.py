"""The command line: options, the --quick preset, and the defaults unset options get."""

from __future__ import annotations

import argparse
from typing import Any

import scripts.bench
from engine.quant.scheme import parse_rtn
from engine.random_model import ARCHITECTURES, SHAPES
from engine.sampling_params import MAX_LOGPROBS

SYSTEMS = ("naive", "hf-cb", "engine", "engine-eager", "llama.cpp")
DEFAULT_SYSTEMS = ["naive", "hf-cb", "engine"]
FLOAT_PRECISIONS = ("float32", "bfloat16", "float16")
QUICK_INT4 = "int4-g32"  # --quick's int4: a group size the tiny model's inputs divide

# --quick: seconds on two CPU cores, every code path exercised (shared prefix included).
QUICK_PRESET: dict[str, Any] = dict(
    random_model="tiny", rows=6, prompt_len="4-24", max_tokens="4-16", naive_batch=4,
    shared_prefix_frac=0.5, shared_prefix_len=16, max_num_seqs=8,
    max_num_batched_tokens=64, dtype="float32",
)
DEFAULTS: dict[str, Any] = dict(
    rows=256, prompt_len="16-512", max_tokens="16-256", naive_batch=32,
    shared_prefix_frac=0.0, shared_prefix_len=128, max_num_seqs=256,
    max_num_batched_tokens=4096, dtype="auto",
)


def parse_range(text: str) -> tuple[int, int]:
    """'16-512' -> (16, 512); '32' -> (32, 32)."""
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"bad range {text!r}: want MIN-MAX, e.g. 16-512") from None
    if not 1 <= low <= high:
        raise ValueError(f"bad range {text!r}: want MIN-MAX with 1 <= MIN <= MAX")
    return low, high


def parse_list(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
    return items


def parse_quant_list(text: str) -> list[str]:
    """Float dtypes and load-time quantizations ("int8", "int4", "int4-g<N>", "int8-g<N>")."""
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    for item in items:
        if item in FLOAT_PRECISIONS:
            continue
        try:
            parse_rtn(item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{exc}; or a float dtype: {list(FLOAT_PRECISIONS)}"
            ) from None
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description=(scripts.bench.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # None defaults are filled by --quick or by DEFAULTS in finish_args().
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local Hugging Face model folder")
    src.add_argument("--random-model", choices=sorted(SHAPES),
                     help="build a random-weight model of this shape (default: small)")
    p.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES),
                   help="architecture of --random-model")
    p.add_argument("--cache-dir", default=".batchinfer/bench-models",
                   help="where random models are built and kept")
    p.add_argument("--parquet", help="take prompts from this Parquet file instead")
    p.add_argument("--column", default="prompt", help="text column of --parquet")
    p.add_argument("--rows", type=int, help="rows to run (default 256; all of --parquet)")
    p.add_argument("--prompt-len", help="MIN-MAX prompt tokens, skewed (default 16-512)")
    p.add_argument("--max-tokens", help="MIN-MAX generated tokens per row, skewed (default 16-256)")
    p.add_argument("--shared-prefix-frac", type=float,
                   help="fraction of rows that start with a common system prompt (default 0)")
    p.add_argument("--shared-prefix-len", type=int, help="its length in tokens (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", *FLOAT_PRECISIONS],
                   help="auto: bfloat16 on CUDA or a CPU with avx512_bf16/AMX, else float32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--systems", type=lambda s: parse_list(s, SYSTEMS), default=DEFAULT_SYSTEMS,
                   help="comma list of naive,hf-cb,engine,engine-eager,llama.cpp (default: "
                        "naive,hf-cb,engine; absent ones are skipped). llama.cpp runs the "
                        "same weights as GGUF: the run's float dtype, Q8_0, and Q4_0 when "
                        "--quant has int4")
    p.add_argument("--naive-batch", type=int,
                   help="rows per HF generate call (default 32: a usual hand-picked batch; "
                        "bigger batches waste more steps waiting for the batch's longest row)")
    p.add_argument("--max-num-seqs", type=int, help="engine/hf-cb sequence cap (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="engine/hf-cb token budget per step (default 4096)")
    p.add_argument("--kv-cache-gib", type=float,
                   help="KV cache size for engine and hf-cb (default: auto on CUDA; on CPU the "
                        "workload's whole KV, at most 4 GiB)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--block-size", type=int, default=16,
                   help="engine KV block size in tokens (default 16)")
    p.add_argument("--quant", type=parse_quant_list, default=[],
                   help="also run the engine at each of these precisions, e.g. "
                        "float32,bfloat16,int8,int4,int4-g64,int8-g128")
    p.add_argument("--structured", choices=["json", "regex", "choice"],
                   help="also run the engine with every row constrained to a small fixed "
                        "JSON schema, regex or choice, against the engine unconstrained")
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="also run the engine with every row scored (top K logprobs per "
                        "token), against the engine unconstrained")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of --structured / --logprobs against the baseline, "
                        "interleaved; medians compared (default 1; on a shared machine 3)")
    p.add_argument("--threads", type=int,
                   help="CPU threads per system (OMP_NUM_THREADS; default: torch's choice). "
                        "On a shared CPU, fewer threads than busy cores avoids spin-wait stalls")
    p.add_argument("--quick", action="store_true", help="tiny model, 6 rows: a smoke test")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one task file
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from --quick or the defaults, then check them (ValueError)."""
    defaults = dict(DEFAULTS)
    if args.quick:
        defaults.update(QUICK_PRESET)
        # The tiny model's hidden size (64) cannot hold int4's default groups of 128.
        args.quant = [QUICK_INT4 if item == "int4" else item for item in args.quant]
    if args.parquet:
        defaults["rows"] = None  # all of the file
    if not args.model and not args.random_model:
        args.random_model = defaults.pop("random_model", "small")
    defaults.pop("random_model", None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.prompt_len = parse_range(str(args.prompt_len))
    args.max_tokens = parse_range(str(args.max_tokens))
    if not 0.0 <= args.shared_prefix_frac <= 1.0:
        raise ValueError("--shared-prefix-frac must be within [0, 1]")
    if args.logprobs is not None and not 0 <= args.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"--logprobs must be within [0, {MAX_LOGPROBS}]")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.rows is not None and args.rows < 1:
        raise ValueError("--rows must be >= 1")
    return args
