"""Throughput benchmark: batchinfer's engine side by side with Hugging Face baselines.

One run, one model, one dtype, one set of rows with skewed lengths, three systems:

  naive   transformers `generate` over fixed batches of --naive-batch rows in input order,
          left-padded, greedy, every row of a batch generating the batch's largest max_tokens
          (min_new_tokens likewise so EOS cannot end it early); only each row's own
          max_tokens count as useful.
  hf-cb   transformers' own continuous batching (the manager behind `generate_batch`),
          one request per row with the row's max_new_tokens and EOS disabled.
  engine  `engine.LLM.generate` with SamplingParams(max_tokens=row's, temperature=0,
          ignore_eos=True) per row.
  engine-eager
          the same with LLM(enforce_eager=True): no CUDA graphs (on CPUs the same as
          engine). Not run by default: `--systems engine,engine-eager` shows what the
          graphs give on a GPU.

Every system must produce the same number of useful tokens (the sum of the rows'
max_tokens); the JSON says whether they did. Each system runs in its own child process so
its peak RSS / GPU memory is its own and a crash in one cannot take the others down. The
same run measures this machine's matmul throughput and memory bandwidth and reports each
system's wall time against the roofline bound of the workload.

    python scripts/bench.py --random-model small --dtype bfloat16 --rows 256 \
        --prompt-len 16-512 --max-tokens 16-256 [--out bench.json]
    python scripts/bench.py --model DIR --parquet prompts.parquet --column prompt
    python scripts/bench.py --quick                      # seconds; what tests/test_bench.py runs

JSON goes to stdout (or --out FILE), a readable table to stderr. Top-level keys:
schema, command, config, machine, model, workload, systems{naive,hf-cb,engine[,engine-eager]},
expected_useful_tokens, useful_tokens_match, roofline, quant[]. A system entry has
status ("ok" | "skipped" | "error"), note/error, wall_s, rows, prompt_tokens,
useful_tokens, useful_tok_s, total_tok_s, ratio_vs_naive, mean_batch_fill, preemptions,
prefix_cache_hit_tokens, steps, peak_rss_mib, gpu_peak_allocated_mib,
gpu_peak_reserved_mib, roofline_bound_s, roofline_efficiency_pct, wall_pct_of_bound.

On a CPU shared with other jobs, pass --threads 1: two OpenMP threads on two cores stall
for whole time slices whenever another process holds a core (a tiny model's decode step
went from 1 ms to 250 ms here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a file: make `scripts` and `engine` importable
    sys.path.insert(0, str(REPO_ROOT))

SCHEMA = "batchinfer.bench/1"
SYSTEMS = ("naive", "hf-cb", "engine", "engine-eager")
DEFAULT_SYSTEMS = ["naive", "hf-cb", "engine"]
FLOAT_PRECISIONS = ("float32", "bfloat16", "float16")
QUANT_PRECISIONS = ("int8", "int4")
MIB = 1024 * 1024
QUICK_INT4 = "int4-g32"  # --quick's int4: a group size the tiny model's inputs divide

# --quick: seconds on two CPU cores, every code path exercised (shared prefix included).
QUICK_PRESET: dict[str, Any] = dict(
    random_model="tiny", rows=6, prompt_len="4-24", max_tokens="4-16", naive_batch=4,
    shared_prefix_frac=0.5, shared_prefix_len=16, max_num_seqs=8,
    max_num_batched_tokens=64, dtype="float32",
)


# ----------------------------------------------------------------------------- CLI


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
    from engine.quant.scheme import parse_rtn

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
    from scripts.make_tiny_model import ARCHITECTURES, SHAPES

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # None defaults are filled by --quick or by the normal defaults in finish_args().
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
                   help="comma list of naive,hf-cb,engine,engine-eager (default: "
                        "naive,hf-cb,engine; absent ones are skipped)")
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
    p.add_argument("--quant", type=parse_quant_list, default=[],
                   help="also run the engine at each of these precisions, e.g. "
                        "float32,bfloat16,int8,int4,int4-g64,int8-g128")
    p.add_argument("--threads", type=int,
                   help="CPU threads per system (OMP_NUM_THREADS; default: torch's choice). "
                        "On a shared CPU, fewer threads than busy cores avoids spin-wait stalls")
    p.add_argument("--quick", action="store_true", help="tiny model, 6 rows: a smoke test")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one task file
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from --quick or the defaults, then check them (ValueError)."""
    defaults: dict[str, Any] = dict(
        rows=256, prompt_len="16-512", max_tokens="16-256", naive_batch=32,
        shared_prefix_frac=0.0, shared_prefix_len=128, max_num_seqs=256,
        max_num_batched_tokens=4096, dtype="auto",
    )
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
    if args.rows is not None and args.rows < 1:
        raise ValueError("--rows must be >= 1")
    return args


# ---------------------------------------------------------------------- device, dtype


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat float32 on CPUs with avx512_bf16 or AMX; elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda but torch sees no CUDA device")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "bfloat16" if device == "cuda" or cpu_has_fast_bf16() else "float32"


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Other people's load on a shared machine skews every number: keep it on record.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "cpu_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0],
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------ model


@dataclass
class ModelInfo:
    """The shape facts the FLOP and byte counts need, read from config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    tied: bool

    @classmethod
    def from_dir(cls, path: Path) -> ModelInfo:
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
            context=cfg.get("max_position_embeddings", 2048),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        """Matmul weights of all decoder layers: q, k, v, o and the SwiGLU gate, up, down."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def total_params(self) -> int:
        embed = 0 if self.tied else self.hidden * self.vocab
        norms = (2 * self.layers + 1) * self.hidden
        return self.layer_params + self.head_params + embed + norms

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "params": self.total_params, "matmul_params": self.layer_params
                + self.head_params}


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


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
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(saved)


def task_build(task: dict[str, Any]) -> dict[str, Any]:
    from scripts.make_tiny_model import SHAPES, make_tiny_model

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


# --------------------------------------------------------------------------- workload


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def skewed_lengths(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """Lognormal lengths in [low, high]: many short, a long tail, like real prompt sets.

    log(length) is normal at 30% of the way from log(low) to log(high) with a standard
    deviation of 30% of that span, clipped to the range: with 16-512 the median is ~45,
    the mean ~80 and about 1% of rows sit at the maximum.
    """
    if low == high:
        return [low] * n
    span = math.log(high / low)
    out = []
    for _ in range(n):
        x = math.exp(math.log(low) + span * rng.gauss(0.3, 0.3))
        out.append(min(high, max(low, round(x))))
    return out


def usable_token_ids(model_dir: Path, vocab: int) -> list[int]:
    """All ids the model has except the tokenizer's special ones (BOS/EOS/pad mid-prompt would
    make the rows unlike real text and could end a row early)."""
    special: set[int] = set()
    try:
        from transformers import AutoTokenizer

        special = set(AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    except Exception as exc:  # a model folder without a tokenizer still benchmarks
        log(f"no tokenizer in {model_dir} ({exc}); only avoiding ids 0-2")
        special = {0, 1, 2}
    return [i for i in range(vocab) if i not in special]


def random_workload(args: argparse.Namespace, model_dir: Path, info: ModelInfo) -> Workload:
    rng = random.Random(args.seed)
    ids = usable_token_ids(model_dir, info.vocab)
    lengths = skewed_lengths(rng, args.rows, *args.prompt_len)
    max_tokens = skewed_lengths(rng, args.rows, *args.max_tokens)
    prompts = [[rng.choice(ids) for _ in range(n)] for n in lengths]
    notes = []
    if args.shared_prefix_frac > 0 and args.shared_prefix_len > 0:
        prefix = [rng.choice(ids) for _ in range(args.shared_prefix_len)]
        chosen = rng.sample(range(args.rows), round(args.shared_prefix_frac * args.rows))
        for row in chosen:
            prompts[row] = prefix + prompts[row]
        notes.append(f"{len(chosen)} rows start with the same {len(prefix)}-token prefix")
    return fit_context(Workload(prompts, max_tokens, notes), info.context)


def parquet_workload(args: argparse.Namespace, model_dir: Path, info: ModelInfo) -> Workload:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = pq.read_table(args.parquet, columns=[args.column]).column(args.column).to_pylist()
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if args.rows is not None:
        kept = kept[: args.rows]
    if not kept:
        raise SystemExit(f"bench.py: error: no non-empty text in column {args.column!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in kept]
    max_tokens = skewed_lengths(random.Random(args.seed), len(prompts), *args.max_tokens)
    notes = [f"{args.parquet}:{args.column}, {len(prompts)} rows"]
    if len(kept) < len(texts) and args.rows is None:
        notes.append(f"{len(texts) - len(kept)} null/empty rows left out")
    return fit_context(Workload(prompts, max_tokens, notes), info.context)


def fit_context(work: Workload, context: int) -> Workload:
    """Cut prompts so prompt + max_tokens fits the model: every system must be able to run
    every row, or the useful-token totals would not compare."""
    cut = 0
    for i, prompt in enumerate(work.prompts):
        work.max_tokens[i] = min(work.max_tokens[i], context - 1)
        room = context - work.max_tokens[i]
        if len(prompt) > room:
            work.prompts[i] = prompt[:room]
            cut += 1
    if cut:
        work.notes.append(f"{cut} prompts cut to fit the {context}-token context")
    return work


def describe(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 1), "max": max(values), "sum": sum(values)}


# ----------------------------------------------------------------------- child runner


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
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                               str(task_file)], stdout=2, env=env, check=False)
        if result_file.is_file():
            return json.loads(result_file.read_text())
        return {"status": "error", "error": f"child exited with code {proc.returncode}"}


class Skip(Exception):
    """The system is not available here (not installed, too old): reported, not an error."""


def child_main(task_file: str) -> None:
    task = json.loads(Path(task_file).read_text())
    tasks: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "build": task_build, "peaks": task_peaks, "naive": task_naive, "hf-cb": task_hf_cb,
        "engine": task_engine, "engine-eager": task_engine,
    }
    try:
        result = tasks[task["kind"]](task)
    except Skip as exc:
        result = {"status": "skipped", "note": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    result.update(peak_memory(task.get("device", "cpu")))
    if "torch" in sys.modules:
        result["torch_threads"] = sys.modules["torch"].get_num_threads()
    Path(task["result_file"]).write_text(json.dumps(result))


def peak_memory(device: str) -> dict[str, float | None]:
    """This process's peak RSS (ru_maxrss is KiB on Linux) and, on CUDA, peak GPU memory."""
    out: dict[str, float | None] = {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gpu_peak_allocated_mib": None, "gpu_peak_reserved_mib": None,
    }
    if device == "cuda" and "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            out["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
            out["gpu_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
    return out


def load_work(task: dict[str, Any]) -> Workload:
    data = json.loads(Path(task["workload_file"]).read_text())
    return Workload(data["prompts"], data["max_tokens"])


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def warmup_prompts(vocab: int) -> list[list[int]]:
    """Two 8-token prompts from a seed of their own, run before the timed part: shorter than
    a KV block (16), so they leave nothing in a prefix cache for the workload to hit."""
    rng = random.Random(12345)
    return [[rng.randrange(3, vocab) for _ in range(8)] for _ in range(2)]


# ---------------------------------------------------------------------- the systems


def load_hf_model(task: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(task["model"], dtype=getattr(torch, task["dtype"]))
    return model.to(task["device"]).eval()


def task_naive(task: dict[str, Any]) -> dict[str, Any]:
    """HF generate over fixed batches in input order: what a first hand-written job does."""
    import torch

    model = load_hf_model(task)
    work = load_work(task)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=task["device"])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=task["device"])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad)
        return out.shape[1] - width

    generate(warmup_prompts(model.config.vocab_size), 2)
    batch, useful, computed, steps = task["naive_batch"], 0, 0, 0
    synchronize(task["device"])
    started = time.perf_counter()
    for start in range(0, len(work.prompts), batch):
        rows = slice(start, start + batch)
        longest = max(work.max_tokens[rows])
        made = generate(work.prompts[rows], longest)
        if made != longest:
            raise RuntimeError(f"generate made {made} tokens, asked for {longest}")
        useful += sum(work.max_tokens[rows])
        computed += made * len(work.prompts[rows])
        steps += made  # one prefill step (which yields the first token) + made-1 decode steps
    synchronize(task["device"])
    return {"status": "ok", "wall_s": time.perf_counter() - started, "useful_tokens": useful,
            "generated_tokens_computed": computed, "steps": steps}


def task_hf_cb(task: dict[str, Any]) -> dict[str, Any]:
    """transformers' continuous batching. `generate_batch` takes one max_new_tokens for all
    rows, so we drive the manager it wraps, whose add_request takes it per row."""
    model = load_hf_model(task)
    if not hasattr(model, "continuous_batching_context_manager"):
        raise Skip("this transformers has no continuous batching (generate_batch)")
    import transformers
    from transformers import GenerationConfig

    config_cls = getattr(transformers, "ContinuousBatchingConfig", None)
    if config_cls is None:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError as exc:
            raise Skip(f"this transformers has no ContinuousBatchingConfig: {exc}") from exc
        config_cls = ContinuousBatchingConfig
    quiet_psutil_complaint()
    work = load_work(task)
    info = ModelInfo.from_dir(Path(task["model"]))
    cb_config = config_cls(
        max_batch_tokens=task["max_num_batched_tokens"],
        max_requests_per_batch=task["max_num_seqs"],
        allow_block_sharing=task["prefix_caching"],
    )
    # Without a size, HF sizes the cache from free memory: on CPU ~90% of all RAM.
    cb_config.num_blocks = hf_cb_blocks(task, info, getattr(cb_config, "page_size", 256))
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(work.max_tokens),
                                  eos_token_id=-1, pad_token_id=model.config.pad_token_id)
    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True,
        timeout=30,
    ) as manager:
        # First request outside the timing: the manager builds its cache on first use.
        collect(manager, [manager.add_request(p, max_new_tokens=2, eos_token_id=-1)
                          for p in warmup_prompts(info.vocab)])
        synchronize(task["device"])
        started = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
               for p, n in zip(work.prompts, work.max_tokens, strict=True)]
        results = collect(manager, ids)
        synchronize(task["device"])
        wall = time.perf_counter() - started
    errors = [r.error for r in results.values() if r.error]
    if errors or len(results) != len(ids):
        raise RuntimeError(f"{len(ids) - len(results)} requests missing, errors: {errors[:3]}")
    useful = sum(min(len(results[i].generated_tokens), n)
                 for i, n in zip(ids, work.max_tokens, strict=True))
    return {"status": "ok", "wall_s": wall, "useful_tokens": useful,
            "note": "manager of generate_batch, per-row max_new_tokens, eos_token_id=-1"}


def hf_cb_blocks(task: dict[str, Any], info: ModelInfo, page_tokens: int) -> int | None:
    """HF's num_blocks for the KV budget we give every system (None: HF's own auto sizing)."""
    if task["kv_cache_bytes"] is None:
        return None
    block_bytes = page_tokens * info.kv_bytes_per_token(dtype_bytes(task["dtype"]))
    return max(1, task["kv_cache_bytes"] // block_bytes)


def collect(manager: Any, ids: list[str]) -> dict[str, Any]:
    """Wait for every request in ids to finish; return them by id."""
    wanted, done = set(ids), {}
    while wanted - done.keys():
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                break
            continue
        if result.request_id in wanted and result.is_finished():
            done[result.request_id] = result
    return done


def quiet_psutil_complaint() -> None:
    """HF CB logs an ERROR on CPU without psutil even when num_blocks makes memory moot."""
    import logging

    logging.getLogger("ContinuousBatchingLogger").addFilter(
        lambda record: "without psutil" not in record.getMessage()
        and "psutil is not available" not in record.getMessage()
    )


def task_engine(task: dict[str, Any]) -> dict[str, Any]:
    try:
        from engine import LLM, SamplingParams
    except ImportError as exc:
        raise Skip(f"engine not importable: {exc}") from exc
    work = load_work(task)
    kwargs: dict[str, Any] = dict(
        model=task["model"], dtype=task["dtype"], device=task["device"],
        max_num_seqs=task["max_num_seqs"], max_num_batched_tokens=task["max_num_batched_tokens"],
        enable_prefix_caching=task["prefix_caching"], seed=task["seed"],
    )
    if task.get("quantization"):
        kwargs["quantization"] = task["quantization"]
    if task["kind"] == "engine-eager":
        kwargs["enforce_eager"] = True
    if task["kv_cache_bytes"] is not None:
        kwargs["kv_cache_memory"] = task["kv_cache_bytes"]
    llm = LLM(**kwargs)
    llm.generate(warmup_prompts(ModelInfo.from_dir(Path(task["model"])).vocab),
                 SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    before = llm.stats()
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in work.max_tokens]
    synchronize(task["device"])
    started = time.perf_counter()
    outputs = llm.generate(work.prompts, params)
    synchronize(task["device"])
    wall = time.perf_counter() - started
    failed = [o.error for o in outputs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, e.g. {failed[0]}")
    useful = sum(min(len(o.token_ids), n) for o, n in zip(outputs, work.max_tokens, strict=True))
    return {"status": "ok", "wall_s": wall, "useful_tokens": useful,
            **engine_stats_delta(before, llm.stats())}


def engine_stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The timed run's share of the engine's cumulative counters (the warmup is left out)."""
    def delta(key: str) -> Any:
        if not isinstance(after.get(key), int | float):
            return None
        return after[key] - before.get(key, 0)

    steps, scheduled = delta("steps"), delta("scheduled_tokens")
    budget = after.get("token_budget")
    fill = after.get("mean_batch_fill")
    if steps and scheduled is not None and budget:
        fill = scheduled / (steps * budget)
    return {
        "steps": steps, "mean_batch_fill": fill, "preemptions": delta("preemptions"),
        "prefix_cache_hit_tokens": delta("prefix_cache_hit_tokens"),
        "weight_bytes": after.get("weight_bytes"), "kv_blocks_total": after.get("kv_blocks_total"),
        "engine_stats": after,
    }


# --------------------------------------------------------------------------- roofline


def task_peaks(task: dict[str, Any]) -> dict[str, Any]:
    """This machine's matmul FLOP/s at the engine's step shapes and its memory read bandwidth."""
    import torch

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
        uses on CPUs without bf16/fp16 instructions): the bound must be the best path."""
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


def workload_costs(info: ModelInfo, work: Workload, kv_token_bytes: int) -> dict[str, float]:
    """FLOPs and KV traffic of the useful work, independent of any system's schedule.

    Per row with prompt P and G generated tokens, P+G-1 tokens go through the layers (the
    last sampled token is never fed back) and G rows of logits are computed. A token at
    position i attends to i+1 keys: 4*heads*head_dim*(i+1) FLOPs per layer. Decoding the
    token at position i reads the i+1 cached K/V entries; every fed token writes one.
    """
    fed = [len(p) + g - 1 for p, g in zip(work.prompts, work.max_tokens, strict=True)]
    attn_pairs = sum(triangle(n) for n in fed)
    linear = 2 * info.layer_params * sum(fed) + 2 * info.head_params * work.useful_tokens
    attention = 4 * info.layers * info.heads * info.head_dim * attn_pairs
    # Decode tokens sit at positions P .. P+G-2 and read 1+position entries each.
    decode_reads = sum(
        triangle(len(p) + g - 1) - triangle(len(p))
        for p, g in zip(work.prompts, work.max_tokens, strict=True)
    )
    return {
        "fed_tokens": sum(fed), "flops_linear": linear, "flops_attention": attention,
        "flops": linear + attention,
        "kv_bytes": (decode_reads + sum(fed)) * kv_token_bytes,
        "flops_per_cached_token": 2 * info.layer_params,
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


def ideal_bound(costs: dict[str, float], peaks: dict[str, Any], work: Workload,
                args: argparse.Namespace, weight_bytes: int) -> dict[str, Any]:
    """The bound for the fewest steps any schedule could take: the longest row's decode
    steps, or as many full token budgets as the fed tokens need. A system's own bound
    (roofline_bound_s) uses its own step count, so a system that takes many small steps
    (naive) gets a looser bound than this one."""
    steps = max(max(work.max_tokens), math.ceil(costs["fed_tokens"] / args.max_num_batched_tokens))
    bound = roofline_bound(costs, peaks, steps, weight_bytes, None)
    return {"min_steps": steps, "min_steps_bound_s": None if bound is None else round(bound, 6)}


# ----------------------------------------------------------------------------- report


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
    )
    for key in ("preemptions", "prefix_cache_hit_tokens", "steps"):
        entry.setdefault(key, None)
    return entry


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
            f"{'x naive':>8}{'fill':>6}{'RSS MiB':>9}{'GPU MiB':>9}{'preempt':>8}"
            f"{'prefix':>8}{'roof%':>7}")
    log(head)
    log("-" * len(head))
    rows = [(name, entry) for name, entry in report["systems"].items()]
    rows += [(f"engine {q['precision']}", q) for q in report["quant"]]
    for name, e in rows:
        log(f"{name:<16}{e.get('status', '?'):>8}{fmt(e.get('wall_s'), '.2f'):>9}"
            f"{fmt(e.get('useful_tok_s')):>10}{fmt(e.get('total_tok_s')):>10}"
            f"{fmt(e.get('ratio_vs_naive'), '.2f'):>8}{fmt(e.get('mean_batch_fill'), '.3f'):>6}"
            f"{fmt(e.get('peak_rss_mib'), '.0f'):>9}{fmt(e.get('gpu_peak_reserved_mib'), '.0f'):>9}"
            f"{fmt(e.get('preemptions'), 'd'):>8}{fmt(e.get('prefix_cache_hit_tokens'), 'd'):>8}"
            f"{fmt(e.get('roofline_efficiency_pct')):>7}")
        if e.get("status") != "ok":
            log(f"{'':<16}{e.get('error') or e.get('note')}")
        elif e.get("weight_bytes") and name.startswith("engine "):
            log(f"{'':<16}weights {e['weight_bytes'] / MIB:.1f} MiB")
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
    log(f"useful tokens match across systems: {report['useful_tokens_match']}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- main


def default_kv_bytes(args: argparse.Namespace, device: str, info: ModelInfo, work: Workload,
                     dtype: str) -> int | None:
    """One KV budget for engine and hf-cb. On CPU, 'auto' in HF means most of the RAM that
    other people share with us, so we size it for the whole workload, at most 4 GiB."""
    if args.kv_cache_gib is not None:
        return int(args.kv_cache_gib * 1024**3)
    if device == "cuda":
        return None
    total = (work.prompt_tokens + work.useful_tokens) * info.kv_bytes_per_token(dtype_bytes(dtype))
    return min(4 * 1024**3, max(64 * MIB, total))


def run_systems(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    results = {}
    for name in args.systems:
        log(f"running {name} ...")
        result = results[name] = run_child({**base, "kind": name})
        # A line per system as it finishes, so a run cut short still tells something.
        log(f"  {name}: {result.get('status')} {fmt(result.get('wall_s'), '.2f')} s, "
            f"{fmt(result.get('useful_tokens'), 'd')} useful tokens "
            f"{result.get('error') or ''}")
    return results


def run_quant_axis(args: argparse.Namespace, base: dict[str, Any],
                   systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine once per listed precision; int8/int4 keep the run's float dtype."""
    entries = []
    for precision in args.quant:
        quant = None if precision in FLOAT_PRECISIONS else precision
        dtype = base["dtype"] if quant else precision
        if quant is None and dtype == base["dtype"] and "engine" in systems:
            entry = {**systems["engine"], "same_run_as": "engine"}
        else:
            log(f"running engine at {precision} ...")
            # The run's KV capacity in tokens, not in bytes: float32 takes twice bfloat16's.
            kv_bytes = base["kv_cache_bytes"]
            if kv_bytes is not None:
                kv_bytes = kv_bytes * dtype_bytes(dtype) // dtype_bytes(base["dtype"])
            entry = run_child({**base, "kind": "engine", "dtype": dtype, "quantization": quant,
                               "kv_cache_bytes": kv_bytes})
        entries.append({"precision": precision, "dtype": dtype, "quantization": quant, **entry})
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    try:
        args = finish_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # one line on stderr, exit code 2
    if args.threads:  # before torch is imported here or in any child
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # Absolute: HF reads a relative path that is not a folder as a hub repo id.
    model_dir = Path(args.model) if args.model else random_model_dir(args, dtype, device)
    model_dir = model_dir.resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"bench.py: error: {model_dir} has no config.json")
    info = ModelInfo.from_dir(model_dir)
    work = (parquet_workload if args.parquet else random_workload)(args, model_dir, info)
    kv_bytes = default_kv_bytes(args, device, info, work, dtype)

    with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
        workload_file = Path(tmp) / "workload.json"
        workload_file.write_text(json.dumps({"prompts": work.prompts,
                                             "max_tokens": work.max_tokens}))
        base = {
            "model": str(model_dir), "dtype": dtype, "device": device, "seed": args.seed,
            "workload_file": str(workload_file), "naive_batch": args.naive_batch,
            "max_num_seqs": args.max_num_seqs, "prefix_caching": not args.no_prefix_caching,
            "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_bytes": kv_bytes,
        }
        log("measuring matmul throughput and memory bandwidth ...")
        peaks = run_child({
            "kind": "peaks", "device": device, "dtype": dtype, "hidden": info.hidden,
            "intermediate": info.intermediate, "tokens": args.max_num_batched_tokens,
            "decode_tokens": min(args.max_num_seqs, len(work.prompts)),
            "bandwidth_bytes": (256 if args.quick else 1024) * MIB * (4 if device == "cuda" else 1),
            "min_seconds": 0.1 if args.quick else 0.5,
        })
        systems = run_systems(args, base)
        quant = run_quant_axis(args, base, systems)

    report = build_report(args, device, dtype, model_dir, info, work, kv_bytes, peaks,
                          systems, quant)
    report["machine"]["load_average_1m_at_start"] = load_at_start
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print_table(report)
    return 0


def build_report(args: argparse.Namespace, device: str, dtype: str, model_dir: Path,
                 info: ModelInfo, work: Workload, kv_bytes: int | None, peaks: dict[str, Any],
                 systems: dict[str, dict[str, Any]], quant: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    costs = workload_costs(info, work, info.kv_bytes_per_token(dtype_bytes(dtype)))
    matmul_weight_bytes = (info.layer_params + info.head_params) * dtype_bytes(dtype)

    def bound(entry: dict[str, Any]) -> float | None:
        # A step reads every weight but the embedding table, of which it gathers a few rows;
        # the engine's own weight_bytes counts int8/int4 weights at their packed size.
        weights = matmul_weight_bytes
        if entry.get("weight_bytes"):
            embed_dtype = entry.get("dtype", dtype)
            embed = 0 if info.tied else info.hidden * info.vocab * dtype_bytes(embed_dtype)
            weights = entry["weight_bytes"] - embed
        entry_costs = costs
        entry_dtype = entry.get("dtype", dtype)
        if entry_dtype != dtype:  # a float entry of the quant axis: its KV has its own size
            kv_scale = dtype_bytes(entry_dtype) / dtype_bytes(dtype)
            entry_costs = {**costs, "kv_bytes": costs["kv_bytes"] * kv_scale}
        return roofline_bound(entry_costs, peaks, entry.get("steps"), weights,
                              entry.get("prefix_cache_hit_tokens"))

    naive = systems.get("naive", {})
    naive_rate = naive["useful_tokens"] / naive["wall_s"] if naive.get("status") == "ok" else None
    for entry in [*systems.values(), *quant]:
        finish_system(entry, work, naive_rate, bound(entry))
    ran = [e["useful_tokens"] for e in [*systems.values(), *quant] if e.get("status") == "ok"]
    return {
        "schema": SCHEMA,
        "command": [sys.executable, *sys.argv],
        "config": {
            "model": str(model_dir), "random_model": args.random_model, "arch": args.arch,
            "dtype": dtype, "device": device, "seed": args.seed, "rows": len(work.prompts),
            "prompt_len": list(args.prompt_len), "max_tokens": list(args.max_tokens),
            "shared_prefix_frac": args.shared_prefix_frac,
            "shared_prefix_len": args.shared_prefix_len, "parquet": args.parquet,
            "naive_batch": args.naive_batch, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_bytes": kv_bytes, "prefix_caching": not args.no_prefix_caching,
            "systems": args.systems, "quant": args.quant, "quick": args.quick,
        },
        "machine": machine_info(device),
        "model": info.as_dict(),
        "workload": {
            "rows": len(work.prompts), "prompt_tokens": work.prompt_tokens,
            "useful_tokens": work.useful_tokens,
            "prompt_len": describe([len(p) for p in work.prompts]),
            "max_tokens": describe(work.max_tokens), "notes": work.notes,
        },
        "systems": systems,
        "expected_useful_tokens": work.useful_tokens,
        "useful_tokens_match": bool(ran) and all(n == work.useful_tokens for n in ran),
        "roofline": {**peaks, "workload": costs, "matmul_weight_bytes": matmul_weight_bytes,
                     **ideal_bound(costs, peaks, work, args, matmul_weight_bytes)},
        "quant": quant,
    }


if __name__ == "__main__":
    sys.exit(main())
