"""The rows every system runs: seeded random token ids or a Parquet column, with skewed
lengths, cut to fit the model's context."""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ModelConfig
from scripts.bench import log


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

    def write(self, path: Path) -> None:
        """For the children, which run the rows (the notes are the report's)."""
        path.write_text(json.dumps({"prompts": self.prompts, "max_tokens": self.max_tokens}))

    @classmethod
    def read(cls, path: str | Path) -> Workload:
        data = json.loads(Path(path).read_text())
        return cls(data["prompts"], data["max_tokens"])

    def summary(self) -> dict[str, Any]:
        """The JSON's "workload" section."""
        return {
            "rows": len(self.prompts), "prompt_tokens": self.prompt_tokens,
            "useful_tokens": self.useful_tokens,
            "prompt_len": describe([len(p) for p in self.prompts]),
            "max_tokens": describe(self.max_tokens), "notes": self.notes,
        }


def describe(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 1), "max": max(values), "sum": sum(values)}


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


def random_workload(args: argparse.Namespace, model_dir: Path, model: ModelConfig) -> Workload:
    rng = random.Random(args.seed)
    ids = usable_token_ids(model_dir, model.vocab_size)
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
    return fit_context(Workload(prompts, max_tokens, notes), model.max_position_embeddings)


def parquet_workload(args: argparse.Namespace, model_dir: Path, model: ModelConfig) -> Workload:
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
    return fit_context(Workload(prompts, max_tokens, notes), model.max_position_embeddings)


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


def warmup_prompts(vocab: int) -> list[list[int]]:
    """Two 8-token prompts from a seed of their own, run before the timed part: shorter than
    a KV block (16), so they leave nothing in a prefix cache for the workload to hit."""
    rng = random.Random(12345)
    return [[rng.randrange(3, vocab) for _ in range(8)] for _ in range(2)]
