"""Decode steps through engine.cuda_graphs: padded to batch-size buckets, from static buffers.

On CUDA the engine captures the graphs itself and these tests replay them. On CPUs
nothing is captured: the runner is built with decode_graphs=True so that the same padded
steps run eagerly, which checks the padding, the buffers and the scratch block.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import batch_buckets
from engine.model_runner import ModelRunner

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_NUM_SEQS = 12  # buckets 1, 2, 4, 8, 12


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(MAX_NUM_SEQS) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(256)[-3:] == [224, 240, 256]


def graph_llm(model_dir, device: str) -> LLM:
    llm = LLM(
        str(model_dir), dtype="float32", device=device, block_size=16,
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64, kv_cache_memory="2MiB",
    )
    if device == "cpu":
        llm.runner = ModelRunner(
            llm.model, llm.engine_config, llm.block_manager.num_blocks, decode_graphs=True
        )
    return llm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("arch", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 24})],
    ids=["llama", "mistral-sliding-window"],
)
def test_padded_decode_steps_match_hugging_face(make_model, hf, make_prompt, device, arch,
                                                overrides):
    model_dir = make_model(arch, **overrides)
    # Rows finish at different steps, so decode batches shrink through the buckets
    # (7 rows run in the 8-bucket, then 4, 2, 1), padded at every size but 1, 2 and 4.
    lengths = (1, 5, 16, 17, 30, 40, 3)
    max_tokens = (3, 20, 8, 12, 16, 5, 40)
    prompts = [make_prompt(n, seed=n) for n in lengths]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    llm = graph_llm(model_dir, device)
    graphs = llm.runner.graphs
    assert graphs is not None
    if device == "cuda":
        assert sorted(graphs.captured) == batch_buckets(MAX_NUM_SEQS)
    outputs = llm.generate(prompts, params)
    for prompt, output, n in zip(prompts, outputs, max_tokens, strict=True):
        assert len(output.token_ids) == n
        hf.assert_greedy_matches(model_dir, prompt, output.token_ids, n)
    # Padding rows wrote their K/V to the scratch block past the block manager's pool.
    scratch = llm.runner.kv_cache[:, :, llm.block_manager.num_blocks]
    assert bool(scratch.abs().sum() > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_steps_sample_like_eager_steps(make_model, make_prompt, device):
    # Seeded sampling draws from the logits rows of the sampled sequences only: the same
    # rows, the same draws, whether a step was padded or not.
    model_dir = make_model("llama")
    prompts = [make_prompt(n, seed=n) for n in (4, 9, 21)]
    params = [
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        for i in range(3)
    ]
    eager = LLM(
        str(model_dir), dtype="float32", device=device, block_size=16,
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64, kv_cache_memory="2MiB",
        enforce_eager=True,
    )
    assert eager.runner.graphs is None
    expected = [out.token_ids for out in eager.generate(prompts, params)]
    assert [out.token_ids for out in graph_llm(model_dir, device).generate(prompts, params)] == (
        expected
    )
