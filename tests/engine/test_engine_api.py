"""The public API: bad input, the streaming form, stop conditions, limits and stats."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, RequestOutput, SamplingParams
from engine.stopping import IncrementalDetokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB")


# -- bad input -----------------------------------------------------------------------------


def test_empty_prompt_list_and_mismatched_params(llm):
    with pytest.raises(ValueError, match="non-empty list"):
        llm.generate([])
    with pytest.raises(ValueError, match="non-empty list"):
        llm.generate("a bare string")
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["x"], [GREEDY, GREEDY])


def test_prompts_that_cannot_run_come_back_as_errors(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", max_model_len=64,
              kv_cache_memory="2MiB")
    too_long = [5] * 65
    good, empty, over, foreign = llm.generate(["the cat", "", too_long, [10**6]], GREEDY)
    assert good.finish_reason == "length" and len(good.token_ids) == 12
    assert (empty.finish_reason, empty.error) == ("error", "prompt is empty")
    assert over.finish_reason == "error" and "context length 64" in over.error
    assert over.prompt_tokens == 65 and over.token_ids == [] and over.text == ""
    assert foreign.finish_reason == "error" and "vocabulary" in foreign.error
    for prompt in ("", [], too_long, ["not", "ids"]):
        with pytest.raises(ValueError):
            llm.add_request("bad", prompt, GREEDY)
    assert not llm.has_unfinished_requests()


def test_prompt_larger_than_the_kv_pool(tiny_llama):
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory=2 * block_bytes)
    with pytest.raises(ValueError, match="KV cache holds"):
        llm.add_request("big", [5] * 33, GREEDY)
    # One that fits runs, and stops when the pool (32 tokens) is full.
    output = llm.generate([[5] * 30], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"max_tokens": -3}, {"top_p": 0.0}, {"top_p": 1.5},
     {"temperature": -0.5}, {"top_k": -2}, {"stop": [""]}, {"stop_token_ids": [-1]}],
)
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_string_may_be_a_plain_string():
    assert SamplingParams(stop="END").stop == ["END"]


def test_unknown_model_path_and_unsupported_architecture(tmp_path, tiny_llama):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(missing))
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(gpt2))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        LLM(str(no_weights))


def test_invalid_engine_settings(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama), max_model_len=10_000)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tiny_llama), block_size=0)
    with pytest.raises(ValueError, match="too small"):
        LLM(str(tiny_llama), kv_cache_memory=100)


# -- streaming -----------------------------------------------------------------------------


def test_streaming_add_step_abort(llm, make_prompt):
    prompts = {f"r{i}": make_prompt(8 + i, seed=i) for i in range(3)}
    expected = {o.request_id: o for o in llm.generate(list(prompts.values()), GREEDY)}
    expected = dict(zip(prompts, expected.values(), strict=True))

    llm.add_request("r0", prompts["r0"], GREEDY)
    llm.add_request("r1", prompts["r1"], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("r0", prompts["r0"], GREEDY)
    assert llm.num_unfinished_requests() == 2
    finished: dict[str, RequestOutput] = {}
    for output in llm.step() + llm.step():
        finished[output.request_id] = output
    llm.add_request("r2", prompts["r2"], GREEDY)  # joins the running batch
    llm.abort_request("r1")
    llm.abort_request("never-added")  # unknown ids are ignored
    while llm.has_unfinished_requests():
        for output in llm.step():
            finished[output.request_id] = output
    assert finished["r1"].finish_reason == "aborted"
    assert len(finished["r1"].token_ids) == 2
    for request_id in ("r0", "r2"):
        assert finished[request_id].token_ids == expected[request_id].token_ids
    assert llm.step() == []
    assert llm.stats()["kv_blocks_used"] == 0


def test_generate_keeps_streaming_outputs_for_the_next_step(llm, make_prompt):
    llm.add_request("background", make_prompt(5, seed=3), SamplingParams(max_tokens=2))
    (output,) = llm.generate([make_prompt(5, seed=4)], GREEDY)
    assert output.finish_reason == "length"
    assert [o.request_id for o in llm.step()] == ["background"]
    assert not llm.has_unfinished_requests()


# -- stopping ------------------------------------------------------------------------------


def test_stop_token_ids_and_eos(tiny_llama, tmp_path, llm, make_prompt):
    prompt = make_prompt(10, seed=5)
    greedy = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                   ignore_eos=True))[0].token_ids
    stop_token = greedy[6]
    cut = greedy.index(stop_token)
    stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                    stop_token_ids=[stop_token]))[0]
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", greedy[:cut])

    # The same token as an EOS id from generation_config.json: a stop unless ignore_eos.
    with_eos = tmp_path / "with-eos"
    shutil.copytree(tiny_llama, with_eos)
    (with_eos / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop_token]}))
    eos_llm = LLM(str(with_eos), dtype="float32", device="cpu", kv_cache_memory="1MiB")
    ends = eos_llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=20, temperature=0.0),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ])
    assert (ends[0].finish_reason, ends[0].token_ids) == ("stop", greedy[:cut])
    assert (ends[1].finish_reason, ends[1].token_ids) == ("length", greedy)


def test_stop_string_on_arbitrary_text(llm, make_prompt):
    prompt = make_prompt(12, seed=8)
    full = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                 ignore_eos=True))[0]
    stop = full.text[8:11]
    expected = full.text[: full.text.find(stop)]
    stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                    ignore_eos=True, stop=[stop]))[0]
    assert (stopped.finish_reason, stopped.text) == ("stop", expected)


@pytest.mark.parametrize("model", ["tiny_llama", "stories260k"])
def test_incremental_detokenizer_matches_a_full_decode(request, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    # Spaces that SentencePiece drops at the start of a decode, and characters spread over
    # several byte-level tokens.
    text = "Once upon a time, Lily said: \"café – naïve 日本\"! The dog ran.\nThe end."
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.append(t) for t in token_ids]
    assert "".join(pieces) == detokenizer.text
    assert detokenizer.text == tokenizer.decode(token_ids, skip_special_tokens=True)


def test_max_model_len_ends_generation(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", max_model_len=40,
              kv_cache_memory="1MiB")
    assert llm.max_model_len == 40
    output = llm.generate([[5] * 30], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 10
    output = llm.generate([[5] * 40], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 1


# -- stats ---------------------------------------------------------------------------------


def test_stats(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", max_num_batched_tokens=16,
              kv_cache_memory="1MiB")
    outputs = llm.generate([[5] * 20, [6] * 3], SamplingParams(max_tokens=4, ignore_eos=True))
    stats = llm.stats()
    assert stats["prompt_tokens"] == 23 and stats["generated_tokens"] == 8
    # 23 prompt tokens and 3 more decode tokens per request are computed.
    assert stats["scheduled_tokens"] == 23 + 6
    assert stats["token_budget_fill"] == pytest.approx(29 / (stats["steps"] * 16))
    assert stats["token_budget"] == 16
    # Each request is in every step that runs a chunk of it: the long prompt in two prefill
    # chunks then three decodes, the short one in one prefill then three decodes.
    assert stats["scheduled_seqs"] == 5 + 4
    assert stats["occupancy"] == pytest.approx(9 / (stats["steps"] * 256))
    assert stats["mean_tokens_per_step"] == pytest.approx(29 / stats["steps"])
    assert stats["kv_blocks_total"] == 2**20 // (2 * 2 * 2 * 16 * 16 * 4)
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_peak"] == 3
    assert stats["preemptions"] == 0 and stats["prefix_cache_hit_tokens"] == 0
    params = sum(p.numel() for p in llm.model.parameters())
    assert stats["weight_bytes"] == 4 * params
    assert (stats["device"], stats["dtype"], stats["quantization"]) == ("cpu", "float32", None)
    assert [o.completion_tokens for o in outputs] == [4, 4]
    assert [o.prompt_tokens for o in outputs] == [20, 3]
