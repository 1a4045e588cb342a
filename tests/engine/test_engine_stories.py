"""A real trained model (stories260K): greedy stories equal Hugging Face's, to their end.

This checkpoint ends a story with <s> (id 1, the separator it was trained with), not with
its configured EOS </s> (id 2), which greedy decoding never produces. So the natural end
is id 1: ours stops on it as a stop token id, Hugging Face's generate as an EOS id.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

STORY_END = 1
# Prompts whose greedy stories end within 250 tokens.
PROMPTS = [
    "The cat went to the park.", "The dog saw a tree.", "The dog went to the park.",
    "The sun found a box.", "The cat had a ball.", "The cat saw a tree.",
    "The cat found a box.", "The sun was sad.", "Tim saw a tree.", "Sara had a ball.",
    "Sue was sad.", "The girl liked to play.",
]


@pytest.fixture(scope="module")
def stories_llm(stories260k):
    return LLM(str(stories260k), dtype="float32", device="cpu", kv_cache_memory="32MiB")


def test_greedy_stories_equal_hugging_face(stories_llm, stories260k, hf):
    params = SamplingParams(max_tokens=250, temperature=0.0, stop_token_ids=[STORY_END])
    outputs = stories_llm.generate(PROMPTS, params)
    tokenizer = stories_llm.tokenizer
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert output.prompt_token_ids == prompt_ids
        reference = hf.greedy(stories260k, prompt_ids, 250, eos_token_id=[STORY_END, 2])
        assert reference.token_ids[-1] == STORY_END  # the story really ended
        assert output.finish_reason == "stop"
        assert output.token_ids == reference.token_ids[:-1]  # the stop token is not output
        # The text reads on from the prompt's, the space before its first word included.
        full = tokenizer.decode(prompt_ids + reference.token_ids, skip_special_tokens=True)
        assert tokenizer.decode(prompt_ids, skip_special_tokens=True) + output.text == full
        assert output.completion_tokens == len(output.token_ids)


def test_stop_strings_cut_the_text(stories_llm):
    # Greedy from "Once upon a time": ", there was a little girl named Lily. She loved ..."
    prompt = "Once upon a time"
    full = stories_llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0))[0]
    assert full.text.startswith(", there was a little girl named Lily. She loved")
    stopped = stories_llm.generate(
        [prompt], SamplingParams(max_tokens=30, temperature=0.0, stop=["Lily", "girl named"])
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == ", there was a little "  # the earliest stop string wins
    # Tokens up to the one that completed the stop string are kept (as vLLM does).
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert "girl named" in stories_llm.tokenizer.decode(stopped.token_ids)


def test_bfloat16_runs(stories260k):
    llm = LLM(str(stories260k), dtype="bfloat16", device="cpu", kv_cache_memory="4MiB")
    assert llm.dtype == torch.bfloat16 and llm.stats()["dtype"] == "bfloat16"
    output = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert output.text.startswith(", there was")
