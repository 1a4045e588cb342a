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
  llama.cpp
          llama.cpp through llama-cpp-python (the optional extra bench-llama-cpp) on the same
          weights as GGUF, one entry per format: "llama.cpp bf16" (the run's float dtype),
          "llama.cpp q8_0", and "llama.cpp q4_0" when --quant has int4; many sequences
          per llama_decode, greedy, each row's own max tokens. Not run by default.

Every system must produce the same number of useful tokens (the sum of the rows'
max_tokens); the JSON says whether they did. Each system runs in its own child process so
its peak RSS / GPU memory is its own and a crash in one cannot take the others down. The
same run measures this machine's matmul throughput and memory bandwidth and reports each
system's wall time against the roofline bound of the workload.

    python scripts/bench.py --random-model small --dtype bfloat16 --rows 256 \\
        --prompt-len 16-512 --max-tokens 16-256 [--out bench.json]
    python scripts/bench.py --model DIR --parquet prompts.parquet --column prompt
    python scripts/bench.py --quick                      # seconds; what tests/test_bench.py runs

JSON goes to stdout (or --out FILE), a readable table to stderr. Top-level keys:
schema, command, config, machine, model, workload, systems{naive,hf-cb,engine[,engine-eager][,llama.cpp FORMAT]},
expected_useful_tokens, useful_tokens_match, roofline, quant[]. A system entry has
status ("ok" | "skipped" | "error"), note/error, wall_s, rows, prompt_tokens,
useful_tokens, useful_tok_s, total_tok_s, ratio_vs_naive, occupancy (sequences per step
over max_num_seqs: "occ" in the table), mean_batch_fill (tokens per step over the token
budget, which decode steps never fill: "budget" in the table), preemptions,
prefix_cache_hit_tokens, steps, peak_rss_mib, gpu_peak_allocated_mib,
gpu_peak_reserved_mib, roofline_bound_s, roofline_efficiency_pct, wall_pct_of_bound.

On a CPU shared with other jobs, pass --threads 1: two OpenMP threads on two cores stall
for whole time slices whenever another process holds a core (a tiny model's decode step
went from 1 ms to 250 ms here).

Modules: cli (options, presets), main (the run), workload (the rows), random_model,
child (the child-process protocol), hf_baselines, engine_system and llama_cpp_system (the
systems, each run in a child; llama_cpp_runner batches for llama.cpp, gguf_export writes its
files), roofline, sizes (parameter and byte counts), report (JSON and table).
"""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Progress and the table go to stderr: stdout carries only the JSON."""
    print(message, file=sys.stderr, flush=True)
