"""Float32 greedy decoding equals Hugging Face transformers token for token.

Each model variant runs prompts of 1 token, exactly one block, many blocks and longer
than the token budget (so the prompt is prefilled in chunks beside running decodes).
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
YARN_ROPE = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    "original_max_position_embeddings": 128,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

# (id, arch, config overrides, randomise norms and biases)
VARIANTS = [
    ("llama-gqa", "llama", {}, False),
    ("llama-mha", "llama", {"num_key_value_heads": 4}, False),
    ("llama-head-dim-32", "llama", {"head_dim": 32}, False),
    ("llama-tied", "llama", {"tie_word_embeddings": True}, False),
    ("llama-attention-bias", "llama", {"attention_bias": True}, True),
    ("llama-rope-linear", "llama", {"rope_parameters": LINEAR_ROPE}, False),
    ("llama-rope-llama3", "llama", {"rope_parameters": LLAMA3_ROPE}, False),
    ("llama-rope-yarn", "llama", {"rope_parameters": YARN_ROPE}, False),
    ("mistral-sliding-window", "mistral", {"sliding_window": 24}, False),
    ("qwen2", "qwen2", {}, True),
    ("qwen3", "qwen3", {}, True),
]
BLOCK_SIZE = 16
PROMPT_LENGTHS = (1, BLOCK_SIZE, 70, 100)  # the last two exceed the token budget
TOKEN_BUDGET = 32
MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    ("arch", "overrides", "perturbed"),
    [pytest.param(*variant, id=name) for name, *variant in VARIANTS],
)
def test_greedy_matches_hugging_face(
    make_model, perturb, hf, make_prompt, arch, overrides, perturbed
):
    model_dir = make_model(arch, **overrides)
    if perturbed:
        model_dir = perturb(model_dir)
    prompts = [make_prompt(n, seed=n) for n in PROMPT_LENGTHS]
    llm = LLM(
        str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
        max_num_batched_tokens=TOKEN_BUDGET, kv_cache_memory="2MiB",
    )
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.finish_reason == "length"
        assert len(output.token_ids) == MAX_TOKENS
        hf.assert_greedy_matches(model_dir, prompt, output.token_ids, MAX_TOKENS)


def test_preemption_keeps_outputs_exact(tiny_llama, hf, make_prompt):
    """A KV pool far too small for the batch: sequences are preempted and recomputed."""
    prompts = [make_prompt(20 + 2 * i, seed=100 + i) for i in range(10)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    block_bytes = 2 * 2 * 2 * 16 * BLOCK_SIZE * 4  # K+V, 2 layers, 2 kv heads, head_dim 16, fp32
    llm = LLM(
        str(tiny_llama), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
        kv_cache_memory=12 * block_bytes,
    )
    assert llm.stats()["kv_blocks_total"] == 12
    outputs = llm.generate(prompts, params)
    assert llm.stats()["preemptions"] > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(output.token_ids) == 40
        hf.assert_greedy_matches(tiny_llama, prompt, output.token_ids, 40)
    assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefixes(tiny_llama, hf, make_prompt, prefix_caching):
    system = make_prompt(40, seed=7)  # two full blocks and a partial one
    prompts = [system + make_prompt(5 + i, seed=200 + i) for i in range(6)]
    exact_blocks = make_prompt(2 * BLOCK_SIZE, seed=9)  # served twice, wholly cacheable
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = LLM(
        str(tiny_llama), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
        kv_cache_memory="2MiB", enable_prefix_caching=prefix_caching,
    )
    first = llm.generate([prompts[0], exact_blocks], params)
    rest = llm.generate(prompts[1:] + [exact_blocks], params)
    outputs = first + rest
    all_prompts = [prompts[0], exact_blocks, *prompts[1:], exact_blocks]
    for prompt, output in zip(all_prompts, outputs, strict=True):
        hf.assert_greedy_matches(tiny_llama, prompt, output.token_ids, 12)
    assert outputs[-1].token_ids == outputs[1].token_ids

    cached = [output.cached_tokens for output in rest]
    if prefix_caching:
        assert cached[:-1] == [2 * BLOCK_SIZE] * 5  # the system prompt's two full blocks
        # A fully cached prompt still computes its last block, for the last token's logits.
        assert cached[-1] == BLOCK_SIZE
        assert llm.stats()["prefix_cache_hit_tokens"] == sum(cached)
    else:
        assert cached == [0] * 6
        assert llm.stats()["prefix_cache_hit_tokens"] == 0


def test_prefix_caching_on_and_off_agree(tiny_llama, make_prompt):
    system = make_prompt(50, seed=11)
    prompts = [system + make_prompt(3 + i, seed=300 + i) for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for caching in (True, False):
        # A small budget admits the prompts over several steps, so later ones hit the cache.
        llm = LLM(
            str(tiny_llama), dtype="float32", device="cpu", max_num_batched_tokens=64,
            kv_cache_memory="2MiB", enable_prefix_caching=caching,
        )
        results[caching] = [o.token_ids for o in llm.generate(prompts, params)]
        assert (llm.stats()["prefix_cache_hit_tokens"] > 0) == caching
    assert results[True] == results[False]
