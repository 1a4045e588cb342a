"""Logprobs of generated and prompt tokens equal Hugging Face's float32 log-softmax.

The reference runs the same model over prompt + generated tokens once: position p's
log-softmax scores token p + 1. Values agree within 1e-4; ranks and top-K sets agree
exactly, up to near-ties in the reference (two tokens within 1e-5 may swap places).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, CompletionOutput, Logprob, SamplingParams
from engine.logprobs import logprob_dicts, top_k
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler

TOLERANCE = 1e-4
TIE = 1e-5
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB")


def reference_logprobs(hf, model_dir, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab]: row p is the log-softmax that scores token p + 1."""
    with torch.no_grad():
        logits = hf.model(model_dir)(torch.tensor([token_ids])).logits[0]
    return logits.float().log_softmax(dim=-1)


def assert_entry_matches(entry: dict[int, Logprob], token_id: int, num_top: int,
                         reference: torch.Tensor) -> None:
    """One position's dict against the reference row: the scored token with its true
    rank, then the top num_top tokens with ranks 1..num_top."""
    assert token_id in entry
    value = float(reference[token_id])
    scored = entry[token_id]
    assert abs(scored.logprob - value) < TOLERANCE
    surely_ahead = int((reference > value + TIE).sum())
    maybe_ahead = int((reference >= value - TIE).sum())
    assert surely_ahead + 1 <= scored.rank <= maybe_ahead, (scored, surely_ahead, maybe_ahead)
    ordered = reference.sort(descending=True).values
    top = {t: lp for t, lp in entry.items() if t != token_id or lp.rank <= num_top}
    assert sorted(lp.rank for lp in top.values()) == list(range(1, num_top + 1))
    for top_id, logprob in top.items():
        assert abs(logprob.logprob - float(reference[top_id])) < TOLERANCE
        # The token at rank r has the reference's r-th largest value: the same token,
        # or one tied with it.
        assert abs(float(reference[top_id]) - float(ordered[logprob.rank - 1])) < TIE
    assert len(entry) == num_top + (scored.rank > num_top)


def assert_output_matches(hf, model_dir, prompt: list[int], output, num_top: int | None,
                          num_prompt_top: int | None) -> None:
    completion = output.outputs[0]
    reference = reference_logprobs(hf, model_dir, prompt + completion.token_ids)
    if num_top is not None:
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, (token_id, entry) in enumerate(
            zip(completion.token_ids, completion.logprobs, strict=True)
        ):
            assert_entry_matches(entry, token_id, num_top, reference[len(prompt) - 1 + i])
        total = sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs,
                                                 strict=True))
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-9)
    if num_prompt_top is not None:
        assert len(output.prompt_logprobs) == len(prompt)
        assert output.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            assert_entry_matches(output.prompt_logprobs[j], prompt[j], num_prompt_top,
                                 reference[j - 1])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_hugging_face(make_model, perturb, hf, make_prompt, arch, temperature):
    model_dir = make_model(arch) if arch == "llama" else perturb(make_model(arch))
    llm = LLM(str(model_dir), **ENGINE)
    prompts = [make_prompt(n, seed=n) for n in (1, 7, 16, 40)]
    params = [
        SamplingParams(max_tokens=12, temperature=temperature, seed=i, ignore_eos=True,
                       logprobs=k, prompt_logprobs=pk)
        for i, (k, pk) in enumerate([(5, 3), (0, 0), (20, 20), (2, None)])
    ]
    outputs = llm.generate(prompts, params)
    for prompt, param, output in zip(prompts, params, outputs, strict=True):
        assert_output_matches(hf, model_dir, prompt, output, param.logprobs,
                              param.prompt_logprobs)


def test_sampled_token_outside_the_top_k_keeps_its_true_rank(tiny_llama, hf, make_prompt):
    prompt = make_prompt(10, seed=3)
    # A hot temperature over a random model's flat distribution: most picks are not the
    # most likely token, and the reported top-1 is another token.
    params = SamplingParams(max_tokens=30, temperature=2.0, seed=1, ignore_eos=True, logprobs=1)
    output = LLM(str(tiny_llama), **ENGINE).generate([prompt], params)[0]
    assert_output_matches(hf, tiny_llama, prompt, output, 1, None)
    completion = output.outputs[0]
    outside = [(t, e) for t, e in zip(completion.token_ids, completion.logprobs, strict=True)
               if e[t].rank > 1]
    assert len(outside) > 10
    for token_id, entry in outside:
        assert len(entry) == 2  # the sampled token, then the top-1
        assert [lp.rank for lp in entry.values()] == [entry[token_id].rank, 1]
        assert next(iter(entry)) == token_id  # vLLM's order: the sampled token first


def test_stories260k_logprobs(stories260k, hf):
    llm = LLM(str(stories260k), dtype="float32", device="cpu", kv_cache_memory="32MiB")
    prompts = ["Once upon a time", "The cat went to the park."]
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=5, prompt_logprobs=5,
                            stop_token_ids=[1])
    for text, output in zip(prompts, llm.generate(prompts, params), strict=True):
        prompt = llm.tokenizer(text)["input_ids"]
        assert_output_matches(hf, stories260k, prompt, output, 5, 5)
        entry = output.outputs[0].logprobs[0]
        token_id = output.token_ids[0]
        assert entry[token_id].rank == 1  # greedy: the sampled token is the most likely
        # As text, as vLLM: a word's first token with its space, a byte token as its byte.
        piece = llm.tokenizer.convert_ids_to_tokens(token_id)
        assert entry[token_id].decoded_token == piece.replace("\u2581", " ")
    spelled = {t: llm.tokenizer.convert_ids_to_tokens(t) for t in range(llm.config.vocab_size)}
    newline = next(t for t, piece in spelled.items() if piece == "<0x0A>")
    word = next(t for t, piece in spelled.items() if piece == "\u2581the")
    assert llm._token_text[newline] == "\n" and llm._token_text[word] == " the"


def test_prompt_logprobs_with_a_cached_prefix(tiny_llama, hf, make_prompt):
    system = make_prompt(40, seed=7)  # two full blocks and a partial one
    first, second = system + make_prompt(6, seed=8), system + make_prompt(9, seed=9)
    llm = LLM(str(tiny_llama), enable_prefix_caching=True, **ENGINE)
    llm.generate([first], SamplingParams(max_tokens=2, temperature=0.0))
    plain, scored = llm.generate(
        [second, second],
        [SamplingParams(max_tokens=4, temperature=0.0),
         SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=4)],
    )
    assert plain.cached_tokens == 32  # the shared prefix was in the cache
    assert scored.cached_tokens == 0  # and was recomputed, to score every position
    assert scored.token_ids == plain.token_ids
    assert_output_matches(hf, tiny_llama, second, scored, None, 4)
    assert plain.prompt_logprobs is None


BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4  # K+V, 2 layers, 2 kv heads, head_dim 16, 16 tokens, fp32


def test_prompt_logprobs_over_chunked_prefill(tiny_llama, hf, make_prompt):
    prompts = [make_prompt(n, seed=50 + n) for n in (70, 45, 33, 20)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    # A budget of 16 tokens cuts every prompt into chunks beside running decodes.
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", max_num_batched_tokens=16,
              kv_cache_memory="2MiB")
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_output_matches(hf, tiny_llama, prompt, output, 3, 2)


def test_prompt_preempted_while_scored_is_scored_once(tiny_llama, hf, make_prompt,
                                                      monkeypatch):
    preempted_while_scoring = []
    preempt = Scheduler._preempt

    def recording_preempt(self, seq):
        preempted_while_scoring.append(seq.prompt_logprobs_pending)
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", recording_preempt)
    # Two decoding sequences outgrow an 8-block pool while the long prompt is prefilled
    # in chunks: it is preempted part-scored, recomputed, and scores each token once.
    prompts = [make_prompt(20, seed=1), make_prompt(20, seed=2), make_prompt(70, seed=3)]
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)] * 2 + [
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2,
                       prompt_logprobs=2)
    ]
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", max_num_batched_tokens=16,
              kv_cache_memory=8 * BLOCK_BYTES)
    outputs = llm.generate(prompts, params)
    assert any(preempted_while_scoring)
    assert_output_matches(hf, tiny_llama, prompts[2], outputs[2], 2, 2)
    for prompt, output in zip(prompts[:2], outputs[:2], strict=True):
        hf.assert_greedy_matches(tiny_llama, prompt, output.token_ids, 60)


def test_logprobs_in_decode_graph_steps(tiny_llama, hf, make_prompt):
    """One token per step: every step, prompt chunks included, runs as a padded decode
    step (engine/cuda_graphs.py, eager on CPUs), scoring prompt rows as well."""
    llm = LLM(str(tiny_llama), max_num_seqs=4, max_num_batched_tokens=1, **ENGINE)
    llm.runner = ModelRunner(llm.model, llm.engine_config, llm.block_manager.num_blocks,
                             decode_graphs=True)
    assert llm.runner.graphs is not None
    prompts = [make_prompt(n, seed=n) for n in (5, 12)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=2)
    for prompt, output in zip(prompts, llm.generate(prompts, params), strict=True):
        assert_output_matches(hf, tiny_llama, prompt, output, 2, 2)


def test_output_shapes_and_stop_tokens(tiny_llama, make_prompt):
    llm = LLM(str(tiny_llama), **ENGINE)
    prompt = make_prompt(12, seed=4)
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                  ignore_eos=True, logprobs=2))[0]
    # A stop token id ends the output before it, and its logprob with it.
    stop = free.token_ids[3]
    cut = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                 stop_token_ids=[stop], logprobs=2))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:3]
    assert cut.outputs[0].logprobs == free.outputs[0].logprobs[:3]
    assert cut.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(cut.token_ids, cut.outputs[0].logprobs, strict=True))
    )
    plain = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    (completion,) = plain.outputs
    assert isinstance(completion, CompletionOutput) and completion.index == 0
    assert (plain.text, plain.token_ids, plain.finish_reason, plain.completion_tokens) == (
        completion.text, completion.token_ids, completion.finish_reason,
        len(completion.token_ids),
    )
    assert completion.logprobs is None and completion.cumulative_logprob is None
    assert plain.prompt_logprobs is None
    failed = llm.generate([[]], SamplingParams(logprobs=3))[0]
    assert failed.finish_reason == "error" and failed.outputs[0].logprobs is None


def test_aborted_request_keeps_aligned_logprobs(tiny_llama, make_prompt):
    llm = LLM(str(tiny_llama), **ENGINE)
    llm.add_request("a", make_prompt(5, seed=1), SamplingParams(max_tokens=50, ignore_eos=True,
                                                                 logprobs=1, prompt_logprobs=1))
    for _ in range(4):
        llm.step()
    llm.abort_request("a")
    (output,) = llm.step()
    assert output.finish_reason == "aborted"
    assert len(output.outputs[0].logprobs) == len(output.token_ids) == 4
    assert len(output.prompt_logprobs) == 5


@pytest.mark.parametrize(
    "kwargs",
    [{"logprobs": 21}, {"logprobs": -1}, {"logprobs": True}, {"logprobs": 2.0},
     {"prompt_logprobs": 21}, {"prompt_logprobs": -1}],
)
def test_invalid_logprobs(kwargs):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_ranks_from_the_top_list_and_from_the_whole_vocabulary(num_top):
    """Ranks count the tokens at least as likely (vLLM's >=), whether the scored token is
    the most likely, just past the reported ones, far down, or tied past the list's end;
    the same as counting over the whole vocabulary, which only some rows need."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 50, generator=generator)
    logits[3, :10] = 4.0  # ten tokens tied for first
    logits[4, 7] = logits[4].max() + 1
    tokens = torch.tensor([int(logits[r].argmax()) for r in range(6)] + [0, 1, 2, 3, 4, 5])
    tokens[3] = 9  # one of the tied ones
    tokens[5] = int(logits[5].topk(num_top + 1).indices[-1])  # one past the reported
    dicts = logprob_dicts(logits, tokens, [num_top] * 12, {i: str(i) for i in range(50)})
    reference = logits.log_softmax(dim=-1)
    for row, entry in enumerate(dicts):
        token = int(tokens[row])
        assert entry[token].logprob == pytest.approx(float(reference[row, token]), abs=1e-6)
        at_least_as_likely = int((reference[row] >= reference[row, token]).sum())
        if entry[token].rank > num_top:  # not among the reported: the count
            assert entry[token].rank == at_least_as_likely
        else:  # among them (vLLM): its place in the list, the count if nothing ties
            assert entry[token].rank <= at_least_as_likely
        reported = sorted(((lp.rank, lp.logprob) for t, lp in entry.items()
                           if lp.rank <= num_top and (t != token or lp.rank > 0)))
        if token in entry and entry[token].rank > num_top:
            assert len(entry) == num_top + 1
        # The top K by rank, with the most likely values (which of tied tokens: any).
        assert [rank for rank, _ in reported][:num_top] == list(range(1, num_top + 1))
        assert [value for _, value in reported][:num_top] == pytest.approx(
            reference[row].topk(num_top).values.tolist(), abs=1e-6)


@pytest.mark.parametrize("width", [1000, 4096, 32000])
@pytest.mark.parametrize("k", [1, 3, 7, 22])
def test_two_stage_top_k_equals_topk(width, k):
    """top_k's chunked search finds torch.topk's values and ids: with the top values spread
    over the row, crowded into one chunk, in the partial last chunk, and beside -inf."""
    generator = torch.Generator().manual_seed(width + k)
    values = torch.randn(6, width, generator=generator)
    values[1, 64:64 + k] += 10.0  # all of the top in one chunk
    values[2, -k:] += 10.0  # in the last entries (the partial chunk where there is one)
    values[3, : width // 2] = float("-inf")
    values[4, ::3] = float("-inf")
    expected = values.topk(k, dim=-1)
    got = top_k(values, k)
    assert torch.equal(got[0], expected.values)
    assert torch.equal(got[1], expected.indices)


def test_prompt_logits_are_scored_a_slice_at_a_time(tiny_llama, hf, make_prompt, monkeypatch):
    """A long prompt's logits are computed PROMPT_LOGITS_ELEMENTS at a time: with slices
    of 7 rows, a 60-token prompt's logprobs still equal Hugging Face's."""
    import engine.model_runner

    vocab = 384  # the tiny shape's
    monkeypatch.setattr(engine.model_runner, "PROMPT_LOGITS_ELEMENTS", 7 * vocab)
    prompt = make_prompt(60, seed=61)
    llm = LLM(str(tiny_llama), **ENGINE)
    assert llm.config.vocab_size == vocab
    [output] = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0,
                                                     prompt_logprobs=3, logprobs=2))
    assert len(output.prompt_logprobs) == 60
    assert_output_matches(hf, tiny_llama, prompt, output, 2, 3)
