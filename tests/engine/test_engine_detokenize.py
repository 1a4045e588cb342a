"""Output text reads on from the prompt's: decode(prompt + output) == decode(prompt) + text.

SentencePiece drops a leading space at the start of a decode and byte-level BPE spreads
a character over several tokens, so the output is decoded with the prompt's last tokens
as context (as vLLM does), for the final text and for stop strings alike.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.stopping import IncrementalDetokenizer

STORY_PROMPTS = [
    "Lily saw a big bird", "Once upon a time", "The cat went to the park.", "Tom and Sue",
    "She said, \"Hi", "The dog was sad because",
]
# Words, punctuation, characters of several bytes, and trailing spaces.
TEXT_PROMPTS = ["the cat saw", "Once upon a time,", "café – naïve 日本", "tom ran. ", "a\n"]


@pytest.fixture(scope="module")
def stories_llm(stories260k):
    return LLM(str(stories260k), dtype="float32", device="cpu", kv_cache_memory="32MiB")


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB")


def decode(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def assert_reads_on_from_the_prompt(tokenizer, output) -> None:
    prompt_text = decode(tokenizer, output.prompt_token_ids)
    full = decode(tokenizer, output.prompt_token_ids + output.token_ids)
    assert prompt_text + output.text == full, (prompt_text, output.text, full)


def assert_cut_reads_on_from_the_prompt(tokenizer, output) -> None:
    """Text cut before a stop string is the start of what the tokens add to the prompt."""
    prompt_text = decode(tokenizer, output.prompt_token_ids)
    full = decode(tokenizer, output.prompt_token_ids + output.token_ids)
    assert full.startswith(prompt_text + output.text), (prompt_text, output.text, full)


def text_after_prompt(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What a full decode adds to the prompt's text; where the prompt ends inside a
    character, its U+FFFD becomes the character the output completes, which the output
    text then starts with."""
    prompt_text = decode(tokenizer, prompt_ids)
    full = decode(tokenizer, prompt_ids + output_ids)
    return full[len(os.path.commonprefix([prompt_text, full])) :]


# -- a real SentencePiece model --------------------------------------------------------------


def test_stories_text_keeps_the_space_before_its_first_word(stories_llm):
    tokenizer = stories_llm.tokenizer
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    outputs = stories_llm.generate(STORY_PROMPTS, greedy)
    assert outputs[0].text.startswith(" named Ducky. ")  # as vLLM gives it
    for output in outputs:
        assert_reads_on_from_the_prompt(tokenizer, output)
    # The same prompts as token ids, and ones whose last tokens are special (BOS): a
    # context of only those would decode to nothing and lose the first space again.
    id_prompts = [o.prompt_token_ids for o in outputs]
    id_prompts += [ids + [tokenizer.bos_token_id] * 6 for ids in id_prompts[:2]]
    by_ids = stories_llm.generate(id_prompts, greedy)
    assert [o.text for o in by_ids[: len(outputs)]] == [o.text for o in outputs]
    for output in by_ids:
        assert_reads_on_from_the_prompt(tokenizer, output)


def test_stories_sampled_text_reads_on_from_the_prompt(stories_llm):
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s) for s in range(12)]
    prompts = [STORY_PROMPTS[s % len(STORY_PROMPTS)] for s in range(12)]
    for output in stories_llm.generate(prompts, params):
        assert_reads_on_from_the_prompt(stories_llm.tokenizer, output)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("Ducky", " named "), (" named", ""), ("named", " "), (". ", " named Ducky")],
)
def test_stories_stop_string_cuts_the_same_text(stories_llm, stop, expected):
    prompt = "Lily saw a big bird"
    full = stories_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    stopped = stories_llm.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])
    )[0]
    assert (stopped.finish_reason, stopped.text) == ("stop", expected)
    assert full.text.startswith(stopped.text)
    assert_cut_reads_on_from_the_prompt(stories_llm.tokenizer, stopped)


# -- a byte-level BPE model with random weights -------------------------------------------


def test_random_model_text_reads_on_from_the_prompt(tiny_llm, make_prompt):
    tokenizer = tiny_llm.tokenizer
    # Random weights sample odd bytes: incomplete and invalid UTF-8, special tokens.
    prompts = TEXT_PROMPTS + [tokenizer(p)["input_ids"] for p in TEXT_PROMPTS]
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=s, ignore_eos=True)
              for s in range(len(prompts))]
    outputs = tiny_llm.generate(prompts, params)
    for output in outputs:
        assert_reads_on_from_the_prompt(tokenizer, output)
    assert any("\ufffd" in o.text for o in outputs)  # the odd bytes were there

    # Random prompts may end inside a character.
    id_prompts = [make_prompt(length, seed=length) for length in range(1, len(params) + 1)]
    for output in tiny_llm.generate(id_prompts, params):
        expected = text_after_prompt(tokenizer, output.prompt_token_ids, output.token_ids)
        assert output.text == expected


def test_random_model_stop_string_cuts_the_same_text(tiny_llm):
    tokenizer = tiny_llm.tokenizer
    seeds = range(8)
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=s, ignore_eos=True)
              for s in seeds]
    prompts = [TEXT_PROMPTS[s % len(TEXT_PROMPTS)] for s in seeds]
    outputs = tiny_llm.generate(prompts, params)
    stops = [next(o.text[i : i + 2] for i in range(1, len(o.text))
                  if "\ufffd" not in o.text[i : i + 2]) for o in outputs]
    stopped = tiny_llm.generate(
        prompts, [SamplingParams(max_tokens=30, temperature=1.0, seed=s, ignore_eos=True,
                                 stop=[stop]) for s, stop in zip(seeds, stops, strict=True)]
    )
    for full, cut, stop in zip(outputs, stopped, stops, strict=True):
        assert (cut.finish_reason, cut.text) == ("stop", full.text[: full.text.find(stop)])
        assert_cut_reads_on_from_the_prompt(tokenizer, cut)


# -- the detokenizer alone -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_llama", "stories260k"])
def test_prompt_cut_anywhere(request, model):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    # Both tokenizers spell these characters in byte tokens: a cut may fall inside one,
    # and the prompt's last few tokens may start inside one.
    token_ids = tokenizer("I like 日本日本 food")["input_ids"]
    mid_character = 0
    for cut in range(1, len(token_ids)):
        detokenizer = IncrementalDetokenizer(tokenizer, token_ids[:cut])
        pieces = [detokenizer.append(t) for t in token_ids[cut:]] + [detokenizer.flush()]
        assert "".join(pieces) == detokenizer.text
        assert detokenizer.text == text_after_prompt(tokenizer, token_ids[:cut], token_ids[cut:])
        mid_character += decode(tokenizer, token_ids[:cut]).endswith("\ufffd")
    assert mid_character >= 4
    # Cut after the first byte of 日: the output's text starts with the whole character.
    first_byte = next(cut for cut in range(len(token_ids))
                      if decode(tokenizer, token_ids[:cut]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer, token_ids[:first_byte])
    for token_id in token_ids[first_byte:]:
        detokenizer.append(token_id)
    assert detokenizer.text == "日本日本 food"


@pytest.mark.parametrize("model", ["tiny_llama", "stories260k"])
def test_random_token_ids_read_on_from_the_prompt(request, model):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    generator = torch.Generator().manual_seed(0)
    vocab = torch.arange(len(tokenizer))
    if model == "stories260k":
        # Hugging Face's ByteFallback decoder turns a whole run of byte tokens into U+FFFDs
        # once any of them is invalid, even characters already complete before it: no text
        # grown a token at a time can follow that. Trained models write valid runs; here
        # the bytes come from real text instead.
        is_byte = torch.tensor([t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(
            vocab.tolist())])
        vocab = vocab[~is_byte]
    completed_by_output = 0
    for _ in range(300):
        ids = vocab[torch.randint(len(vocab), (30,), generator=generator)].tolist()
        if model == "stories260k":
            ids[5:5] = tokenizer(" 日本 café", add_special_tokens=False)["input_ids"]
        cut = int(torch.randint(1, 14, (), generator=generator))
        prompt, output = ids[:cut], ids[cut:]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        pieces = [detokenizer.append(t) for t in output] + [detokenizer.flush()]
        assert "".join(pieces) == detokenizer.text
        assert detokenizer.text == text_after_prompt(tokenizer, prompt, output), (prompt, output)
        completed_by_output += not decode(tokenizer, prompt + output).startswith(decode(tokenizer, prompt))
    if model == "tiny_llama":
        assert completed_by_output > 0  # some prompts ended inside a character the output completed
