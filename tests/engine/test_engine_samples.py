"""n samples per request: shared prompt blocks, per-sample seeds, outputs and aborts."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.llm import sample_seed

BLOCK = 16
PROMPT_LEN = 100  # six full blocks to share, four tokens in the seventh


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=BLOCK,
               enable_prefix_caching=False)


def prompt(llm: LLM, offset: int = 0) -> list[int]:
    vocab = llm.config.vocab_size
    return [(7 * i + 3 + offset) % (vocab - 1) + 1 for i in range(PROMPT_LEN)]


def texts(out) -> list[list[int]]:
    return [sample.token_ids for sample in out.outputs]


def test_samples_compute_the_prompt_once_and_share_its_blocks(llm):
    """With the prefix cache off, only the sharing can save the prompt: the blocks used
    grow by each sample's own tail and continuation, and the prompt is computed once."""
    n, max_tokens = 4, 8
    before = llm.stats()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=1, n=n)
    [out] = llm.generate([prompt(llm)], params)
    after = llm.stats()
    assert [sample.index for sample in out.outputs] == list(range(n))
    assert all(len(sample.token_ids) == max_tokens for sample in out.outputs)
    shared = (PROMPT_LEN - 1) // BLOCK
    computed = PROMPT_LEN + max_tokens - 1  # the last sampled token is never fed back
    own = -(-computed // BLOCK) - shared
    assert after["kv_blocks_peak"] == shared + n * own  # alone: n * (shared + own) = 28
    scheduled = after["scheduled_tokens"] - before["scheduled_tokens"]
    assert scheduled == computed + (n - 1) * (computed - shared * BLOCK)
    assert after["prompt_tokens"] - before["prompt_tokens"] == PROMPT_LEN
    assert after["generated_tokens"] - before["generated_tokens"] == n * max_tokens
    assert out.prompt_tokens == PROMPT_LEN and out.completion_tokens == max_tokens
    assert after["kv_blocks_used"] == 0


def test_seeded_samples_are_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=7, n=3)
    [alone] = llm.generate([prompt(llm)], params)
    crowd = llm.generate(
        [prompt(llm, 1), prompt(llm), prompt(llm, 2)],
        [SamplingParams(max_tokens=5, n=2), params, SamplingParams(max_tokens=20, seed=3)],
    )
    assert texts(crowd[1]) == texts(alone)
    assert len({tuple(t) for t in texts(alone)}) == 3  # distinct draws, not one copied
    # Sample 0 draws as a one-sample request with the same seed; sample i as one seeded
    # with sample_seed(seed, i).
    for index in range(3):
        single = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0,
                                seed=sample_seed(7, index))
        [out] = llm.generate([prompt(llm)], single)
        assert out.token_ids == alone.outputs[index].token_ids


def test_greedy_samples_equal_the_single_greedy_output(llm):
    [single] = llm.generate([prompt(llm)], SamplingParams(max_tokens=10, temperature=0.0))
    [many] = llm.generate([prompt(llm)], SamplingParams(max_tokens=10, temperature=0.0, n=5))
    assert texts(many) == [single.token_ids] * 5
    assert many.text == single.text and many.finish_reason == single.finish_reason


def test_samples_survive_preemption_unchanged(tiny_llama, llm):
    """A pool too small for every sample at once preempts some; each still draws what it
    draws with room to spare."""
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, seed=5, n=6)
    [roomy] = llm.generate([prompt(llm)], params)
    block_bytes = llm.engine_config.kv_cache_memory // llm.stats()["kv_blocks_total"]
    small = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=BLOCK,
                enable_prefix_caching=False, kv_cache_memory=16 * block_bytes)
    [tight] = small.generate([prompt(llm)], params)
    assert small.stats()["preemptions"] > 0
    assert texts(tight) == texts(roomy)


def test_each_sample_satisfies_the_structure_and_reports_logprobs(llm):
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no", "maybe"]}},
              "required": ["label"], "additionalProperties": False}
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=2, n=4, logprobs=2,
                            prompt_logprobs=1,
                            structured_outputs=StructuredOutputsParams(json=schema))
    [out] = llm.generate([prompt(llm)], params)
    for sample in out.outputs:
        assert sample.finish_reason == "stop"
        assert json.loads(sample.text)["label"] in {"yes", "no", "maybe"}
        assert len(sample.logprobs) == len(sample.token_ids)
        assert sample.cumulative_logprob == pytest.approx(
            sum(entry[t].logprob for t, entry in zip(sample.token_ids, sample.logprobs,
                                                     strict=True)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == PROMPT_LEN


def test_an_abort_ends_every_sample_in_one_output(llm):
    params = SamplingParams(max_tokens=200, ignore_eos=True, n=3)
    llm.add_request("many", prompt(llm), params)
    llm.step()
    llm.step()
    llm.abort_request("many")
    outputs = llm.step()
    assert [out.request_id for out in outputs] == ["many"]
    assert [s.finish_reason for s in outputs[0].outputs] == ["aborted"] * 3
    assert not llm.has_unfinished_requests()
    assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("n", [0, 129, 2.0, True])
def test_n_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match="n must be an int in 1..128"):
        SamplingParams(n=n)
