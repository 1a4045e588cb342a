"""Repetition, presence and frequency penalties and min-p, against Hugging Face.

Greedy decoding with penalties equals Hugging Face's generate with the matching logits
processors: its RepetitionPenaltyLogitsProcessor, and for presence and frequency (which
transformers lacks) a processor written here from vLLM's (OpenAI's) definition. Min-p
sampling follows the distribution Hugging Face's MinPLogitsWarper leaves.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, MinPLogitsWarper
from transformers import RepetitionPenaltyLogitsProcessor as RepetitionPenalty

from engine import LLM, SamplingParams
from engine.penalties import apply_penalties
from engine.sampler import Sampler
from engine.sequence import Sequence
from tests.engine.conftest import Greedy, assert_same_greedy
from tests.engine.test_engine_sampling import assert_frequencies_match

CPU = torch.device("cpu")
MAX_TOKENS = 24


class OpenAIPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties: over the generated tokens only, minus
    frequency_penalty times each token's count and presence_penalty once if it occurs."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0)


def hf_processors(params: SamplingParams, prompt_len: int) -> LogitsProcessorList:
    """The Hugging Face processors for params' penalties, in vLLM's order."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1:
        processors.append(RepetitionPenalty(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            OpenAIPenalties(prompt_len, params.presence_penalty, params.frequency_penalty)
        )
    return processors


def hf_greedy(hf, model_dir, prompt: list[int], params: SamplingParams) -> Greedy:
    out = hf.model(model_dir).generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None,
        pad_token_id=0, logits_processor=hf_processors(params, len(prompt)),
        output_scores=True, return_dict_in_generate=True,
    )
    # The processed scores: a tie there is a tie of what both sides take the argmax of.
    return Greedy(out.sequences[0, len(prompt) :].tolist(), [s[0] for s in out.scores])


PENALTIES = [
    {},
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.7},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"presence_penalty": -0.5, "frequency_penalty": -0.4},
    {"repetition_penalty": 1.3, "presence_penalty": 0.8, "frequency_penalty": 0.6},
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_penalties_matches_hugging_face(make_model, hf, make_prompt, arch):
    model_dir = make_model(arch)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    # Every setting in one batch: rows with and without penalties side by side.
    prompts = [make_prompt(6 + 5 * i, seed=i) for i in range(len(PENALTIES))] * 2
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **penalties)
        for penalties in PENALTIES
    ] * 2
    outputs = llm.generate(prompts, params)
    plain = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                 ignore_eos=True))
    changed = 0
    for prompt, param, output, unpenalized in zip(prompts, params, outputs, plain, strict=True):
        assert_same_greedy(output.token_ids, hf_greedy(hf, model_dir, prompt, param))
        changed += output.token_ids != unpenalized.token_ids
    assert changed >= len(PENALTIES)  # the penalties did change the outputs


def test_penalties_on_a_batch_of_logits():
    """apply_penalties against a per-row reference, rows without penalties untouched."""
    generator = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab, generator=generator) * 3
    settings = [
        {"repetition_penalty": 1.5, "presence_penalty": 0.3, "frequency_penalty": 0.2},
        {},
        {"presence_penalty": -1.0},
        {"repetition_penalty": 0.8, "frequency_penalty": 2.0},
    ]
    seqs = []
    for i, penalties in enumerate(settings):
        prompt = torch.randint(0, vocab, (10,), generator=generator).tolist()
        seq = Sequence(str(i), prompt, SamplingParams(**penalties), None, None)
        seq.token_ids += torch.randint(0, vocab, (15,), generator=generator).tolist()
        seqs.append(seq)
    penalized = apply_penalties(logits, seqs)
    for row, seq in enumerate(seqs):
        reference = hf_processors(seq.params, seq.num_prompt_tokens)(
            torch.tensor([seq.token_ids]), logits[row : row + 1].clone()
        )[0]
        torch.testing.assert_close(penalized[row], reference, rtol=0, atol=1e-6)
    assert torch.equal(penalized[1], logits[1])
    plain = [Sequence("p", [1, 2], SamplingParams(), None, None)] * 4
    assert apply_penalties(logits, plain) is logits  # no row has any: no work, no copy


@pytest.mark.parametrize(("min_p", "temperature"), [(0.1, 1.0), (0.3, 0.6), (0.9, 1.5)])
def test_min_p_follows_hugging_faces_warper(min_p, temperature):
    logits = torch.tensor([2.0, 1.6, 1.0, 0.5, 0.0, -1.0, -3.0, 1.9])
    expected = torch.softmax(
        MinPLogitsWarper(min_p)(None, (logits / temperature)[None])[0], dim=-1
    )
    n = 20000
    params = [SamplingParams(temperature=temperature, min_p=min_p)] * n
    tokens = Sampler(CPU, seed=0)(logits.expand(n, -1).clone(), params, [None] * n)
    assert_frequencies_match(tokens, expected)
    assert set(tokens) == set(torch.nonzero(expected).flatten().tolist())


def test_min_p_comes_before_top_p_over_a_large_vocabulary():
    """vLLM's order: the nucleus is taken from what min-p leaves, renormalised."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, generator=generator) * 2
    min_p, top_p = 0.05, 0.8
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    probs /= probs.sum()
    ordered, ids = probs.sort(descending=True)
    in_nucleus = ordered.cumsum(0) - ordered < top_p
    expected = torch.zeros_like(probs)
    expected[ids[in_nucleus]] = ordered[in_nucleus] / ordered[in_nucleus].sum()
    n = 20000
    params = [SamplingParams(min_p=min_p, top_p=top_p)] * n
    tokens = Sampler(CPU, seed=0)(logits.expand(n, -1).clone(), params, [None] * n)
    assert_frequencies_match(tokens, expected)


def test_min_p_1_is_greedy(tiny_llama, hf, make_prompt):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    prompt = make_prompt(9, seed=5)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, min_p=1.0, seed=0,
                            ignore_eos=True)
    hf.assert_greedy_matches(tiny_llama, prompt, llm.generate([prompt], params)[0].token_ids,
                             MAX_TOKENS)


@pytest.mark.parametrize(
    "kwargs",
    [{"presence_penalty": 2.5}, {"presence_penalty": float("nan")}, {"frequency_penalty": -3},
     {"repetition_penalty": 0}, {"repetition_penalty": -1.0}, {"repetition_penalty": True},
     {"min_p": 1.5}, {"min_p": -0.1}, {"min_p": "0.1"}],
)
def test_invalid_penalties_and_min_p(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
