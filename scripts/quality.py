"""Quality of quantized (or lower-precision) engines: perplexity on texts the float model wrote.

    python scripts/quality.py --model ../shared/models/stories260K
    python scripts/quality.py --model ../shared/models/gptq-llama-int4-g64-fp32 \\
        --gptq ../shared/models/gptq-llama-int4-g64 --configs float32,gptq@float32,int4-g64

The float32 engine of --model samples --num-texts texts (temperature 1, per-text seeds
0..N-1, from BOS alone, up to --max-tokens tokens, stopping at EOS), which are fixed for
the run. Each config then scores every text by teacher forcing through the engine (one
prefill pass per text) and reports perplexity = exp(mean negative log-likelihood over all
tokens after BOS), plus its weight bytes and its logits' largest deviation from float32.

A config is DTYPE (float32 | bfloat16 | float16) or QUANT[@DTYPE] with QUANT one of the
engine's quantization strings (int8, int4, int4-g64, ...; "gptq" loads --gptq) and
DTYPE the activation dtype (default: bfloat16, where the CPU int4/int8 kernels run).
JSON goes to stdout, a table to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a file: make `engine` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402

ENGINE_OPTIONS = dict(device="cpu", kv_cache_memory="64MiB", enable_prefix_caching=False)


def teacher_forced_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """float32 logits [len(token_ids), vocab]: row i is the engine's prediction after
    token_ids[: i + 1], all from one prefill pass of the whole sequence.

    The engine computes logits only for the rows it samples, so this takes the last
    decoder layer's output for every position and applies the final norm and head.
    Needs an engine whose token budget holds the sequence (no chunked prefill) and no
    prefix cache hits (enable_prefix_caching=False), so one step sees every token.
    """
    if llm.engine_config.max_num_batched_tokens < len(token_ids):
        raise ValueError("the engine's max_num_batched_tokens must hold the whole sequence")
    captured: list[torch.Tensor] = []
    last_layer = llm.model.model.layers[-1]
    hook = last_layer.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        llm.generate([list(token_ids)], SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        hook.remove()
    hidden = captured[0]
    if hidden.shape[0] != len(token_ids):
        raise RuntimeError(f"prefill covered {hidden.shape[0]} of {len(token_ids)} tokens")
    with torch.inference_mode():
        return llm.model.lm_head(llm.model.model.norm(hidden)).float()


def sample_texts(llm: LLM, num_texts: int, max_tokens: int) -> list[list[int]]:
    """num_texts token sequences (BOS + sampled tokens) from llm, reproducibly."""
    bos = llm.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token to start texts from")
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)
              for i in range(num_texts)]
    outputs = llm.generate([[bos]] * num_texts, params)
    return [[bos, *out.token_ids] for out in outputs]


def perplexity(logits: list[torch.Tensor], texts: list[list[int]]) -> float:
    """exp(mean NLL) of every token after the first, over all texts together."""
    nll, count = 0.0, 0
    for rows, ids in zip(logits, texts, strict=True):
        targets = torch.tensor(ids[1:])
        log_probs = torch.log_softmax(rows[:-1].double(), dim=-1)
        nll -= float(log_probs.gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def parse_config(text: str) -> tuple[str | None, str]:
    """"bfloat16" -> (None, "bfloat16"); "int8" -> ("int8", "bfloat16"); "int8@float32"."""
    quant, _, dtype = text.partition("@")
    if not dtype and quant in ("float32", "bfloat16", "float16"):
        return None, quant
    return quant, dtype or "bfloat16"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = LLM(model=args.model, dtype="float32", seed=0, **ENGINE_OPTIONS,
                    max_num_batched_tokens=max(4096, args.max_tokens + 1))
    texts = sample_texts(reference, args.num_texts, args.max_tokens)
    reference_logits = [teacher_forced_logits(reference, ids) for ids in texts]
    results = []
    for config in args.configs:
        quant, dtype = parse_config(config)
        model = args.model
        if quant == "gptq" or (quant or "").startswith("gptq-"):
            if not args.gptq:
                raise SystemExit(f"quality.py: error: config {config!r} needs --gptq")
            model = args.gptq
        try:
            llm = LLM(model=model, dtype=dtype, quantization=quant, **ENGINE_OPTIONS,
                      max_num_batched_tokens=max(4096, args.max_tokens + 1))
        except ValueError as error:  # e.g. a group size the model's shapes do not allow
            results.append({"config": config, "model": model, "error": str(error)})
            continue
        logits = [teacher_forced_logits(llm, ids) for ids in texts]
        deviation = max(float((a - b).abs().max()) for a, b in
                        zip(logits, reference_logits, strict=True))
        results.append({
            "config": config, "model": model, "dtype": dtype, "quantization": llm.quantization,
            "perplexity": perplexity(logits, texts), "weight_bytes": llm.stats()["weight_bytes"],
            "max_abs_logit_diff_vs_float32": deviation,
        })
        del llm
    return {
        "model": args.model, "gptq": args.gptq, "num_texts": len(texts),
        "tokens_scored": sum(len(t) - 1 for t in texts), "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(), "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="float model folder (writes the texts)")
    p.add_argument("--gptq", help="a GPTQ checkpoint of --model, for 'gptq' configs")
    p.add_argument("--configs", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   default=["float32", "bfloat16", "int8@float32", "int8@bfloat16"])
    p.add_argument("--num-texts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate(args)
    print(f"{'config':<20}{'perplexity':>12}{'weight MiB':>12}{'max |dlogit|':>14}",
          file=sys.stderr)
    for r in report["results"]:
        if "error" in r:
            print(f"{r['config']:<20}error: {r['error']}", file=sys.stderr)
            continue
        print(f"{r['config']:<20}{r['perplexity']:>12.4f}{r['weight_bytes'] / 2**20:>12.3f}"
              f"{r['max_abs_logit_diff_vs_float32']:>14.4f}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
