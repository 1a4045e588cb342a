"""Sampling: the sampler's distributions and the engine's seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import Sampler

CPU = torch.device("cpu")


def assert_frequencies_match(samples: list[int], probs: torch.Tensor) -> None:
    """Pearson chi-square goodness of fit, rare tokens pooled so each expected count >= 5.

    The bound (dof + 6 sqrt(2 dof)) is exceeded by chance with probability below 1e-6;
    the tests are seeded, so they are deterministic anyway.
    """
    n = len(samples)
    observed = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    expected = probs.double() * n
    common = expected >= 5
    observed = torch.cat([observed[common], observed[~common].sum()[None]])
    expected = torch.cat([expected[common], expected[~common].sum()[None]])
    if expected[-1] == 0:
        assert observed[-1] == 0
        observed, expected = observed[:-1], expected[:-1]
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    assert chi_square < dof + 6 * math.sqrt(2 * dof), (chi_square, dof)


# -- the sampler alone ----------------------------------------------------------------------


def test_greedy_and_sampled_rows_in_one_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)] * 3
    tokens = Sampler(CPU, seed=0)(logits, params, [None] * 6)
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_frequencies_follow_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    params = [SamplingParams(temperature=temperature)] * n
    tokens = Sampler(CPU, seed=0)(logits.expand(n, -1).clone(), params, [None] * n)
    assert_frequencies_match(tokens, torch.softmax(logits / temperature, -1))


def test_top_k_and_top_p_restrict_the_choice():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log()
    n = 20000
    sampler = Sampler(CPU, seed=0)
    # top_p 0.65: 0.4 + 0.3 reaches it, so the nucleus is the first two tokens.
    tokens = sampler(logits.expand(n, -1).clone(), [SamplingParams(top_p=0.65)] * n, [None] * n)
    assert_frequencies_match(tokens, torch.tensor([0.4, 0.3, 0, 0, 0]) / 0.7)
    tokens = sampler(logits.expand(n, -1).clone(), [SamplingParams(top_k=3)] * n, [None] * n)
    assert_frequencies_match(tokens, torch.tensor([0.4, 0.3, 0.2, 0, 0]) / 0.9)


def test_seeded_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(seed=5)] * 4

    def draw(batch_rows: list[int]) -> list[int]:
        generators = [torch.Generator().manual_seed(5) for _ in batch_rows]
        return Sampler(CPU, seed=0)(logits[batch_rows], params[: len(batch_rows)], generators)

    alone = draw([2])
    assert draw([0, 1, 2, 3])[2] == alone[0]
    assert draw([3, 2])[1] == alone[0]


def nucleus_reference(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The top-k / top-p distribution by the definition: sort everything."""
    probs = torch.softmax(logits.double(), -1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    sorted_probs[top_k:] = 0
    sorted_probs /= sorted_probs.sum()
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs / sorted_probs.sum())


def sparse_logits(vocab: int, support: list[int], seed: int) -> torch.Tensor:
    """-inf everywhere but `support`, which gets random logits."""
    logits = torch.full((vocab,), float("-inf"))
    generator = torch.Generator().manual_seed(seed)
    logits[support] = torch.randn(len(support), generator=generator)
    return logits


# A vocabulary of whole chunks and a tail (engine/sampler.py's _CHUNK is 1024); support
# at chunk edges, the first and the last token.
VOCAB = 2600
EDGES = [0, 1, 1022, 1023, 1024, 1025, 2047, 2048, 2599]


@pytest.mark.parametrize(
    ("support", "top_k", "top_p"),
    [
        (EDGES + list(range(100, 2600, 50)), -1, 1.0),  # plain: the chunked inverse CDF
        (EDGES + list(range(5, 2600, 7)), 300, 1.0),  # top-k past the 256 candidates
        (EDGES + list(range(3, 60, 3)), -1, 0.8),  # a nucleus inside the candidates
        (EDGES + list(range(7, 2600, 4)), -1, 0.9),  # a nucleus past them: whole vocabulary
    ],
    ids=["plain", "top-k-300", "nucleus-within", "nucleus-beyond"],
)
def test_large_vocabulary_frequencies(support, top_k, top_p):
    logits = sparse_logits(VOCAB, support, seed=len(support))
    n = 12000
    params = [SamplingParams(top_k=top_k, top_p=top_p)] * n
    tokens = Sampler(CPU, seed=3)(logits.expand(n, -1).clone(), params, [None] * n)
    expected = nucleus_reference(logits, top_k if top_k > 0 else VOCAB, top_p)
    assert set(tokens) <= set(torch.nonzero(expected).flatten().tolist())
    assert_frequencies_match(tokens, expected)


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0 - 2**-24])
def test_inverse_cdf_never_picks_a_zero_weight(u):
    from engine.sampler import _inverse_cdf

    for width, support in [(8, [2, 5]), (3000, [1500]), (3000, [0, 2048, 2999]), (2049, [2048])]:
        weights = torch.zeros(1, width)
        weights[0, support] = torch.tensor([1e-30, 1.0, 3.0][: len(support)])
        index = int(_inverse_cdf(weights, torch.tensor([u]))[0])
        assert index in support, (width, support, u, index)


# -- through the engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(
        str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="16MiB",
        max_num_seqs=8192, max_num_batched_tokens=8192,
    )


# The tiny random model's next-token distribution is flat (max p ~ 1%); at temperature
# 0.35 it is peaked enough that the test tells 0.3 or 0.4 from 0.35.
@pytest.mark.parametrize(("temperature", "seeded"), [(1.0, False), (0.35, True)])
def test_engine_samples_follow_the_model_distribution(llm, tiny_llama, hf, temperature, seeded):
    """8000 one-token samples from one prompt, in one batch, against HF's softmax."""
    prompt = [1]
    n = 8000
    if seeded:
        params = [SamplingParams(max_tokens=1, temperature=temperature, seed=s) for s in range(n)]
    else:
        params = SamplingParams(max_tokens=1, temperature=temperature)
    outputs = llm.generate([prompt] * n, params)
    samples = [o.token_ids[0] if o.token_ids else llm.tokenizer.eos_token_id for o in outputs]
    probs = torch.softmax(hf.next_token_logits(tiny_llama, prompt) / temperature, -1)
    assert_frequencies_match(samples, probs)


def test_engine_top_p_samples_stay_in_the_nucleus(llm, tiny_llama, hf, make_prompt):
    prompt = make_prompt(6, seed=1)
    outputs = llm.generate([prompt] * 1000, SamplingParams(max_tokens=1, top_p=0.3))
    probs = torch.softmax(hf.next_token_logits(tiny_llama, prompt), -1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    nucleus = set(order[mass_before < 0.3].tolist())
    sampled = {o.token_ids[0] for o in outputs}
    assert sampled <= nucleus
    assert len(sampled) > 1


def test_top_k_1_is_greedy(llm, make_prompt):
    prompts = [make_prompt(n, seed=n) for n in (3, 20, 40)]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=16, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_seed_gives_the_same_tokens_whatever_the_batch(tiny_llama, make_prompt):
    target = make_prompt(30, seed=42)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=100, seed=1234,
                            ignore_eos=True)
    others = [make_prompt(10 + 7 * i, seed=500 + i) for i in range(5)]
    noisy = SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True)

    def run(prompts, params_list, **engine_args):
        engine = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="2MiB",
                     **engine_args)
        return engine.generate(prompts, params_list)

    alone = run([target], [params])[0].token_ids
    mixed = run(others + [target], [noisy] * 5 + [params], max_num_batched_tokens=32)
    reordered = run([target] + others[::-1], [params] + [noisy] * 5, seed=99)
    assert mixed[-1].token_ids == alone
    assert reordered[0].token_ids == alone
    different_seed = SamplingParams(**{**params.__dict__, "seed": 4321})
    assert run([target], [different_seed])[0].token_ids != alone
