"""Several streams through one LLM (engine/shared.py): each gets exactly its own outputs,
the same as alone, in one set of batches; step time is shared out, never counted twice."""

from __future__ import annotations

import threading

import pytest

from engine import LLM, SamplingParams
from engine.shared import SharedLLM

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory="4MiB")
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _drain(client, prompts: dict[str, list[int]],
           all_added: threading.Barrier | None = None) -> dict[str, list[int]]:
    for request_id, prompt in prompts.items():
        client.add_request(request_id, prompt, PARAMS)
    if all_added is not None:  # every stream's requests are in before anyone steps
        all_added.wait(60)
    outputs: dict[str, list[int]] = {}
    while len(outputs) < len(prompts):
        for output in client.step():
            assert output.request_id in prompts  # never another stream's
            outputs[output.request_id] = output.token_ids
    return outputs


def test_two_threads_share_one_engine(tiny_llama, make_prompt):
    prompts = {f"r{i}": make_prompt(8 + 3 * i, seed=i) for i in range(12)}
    alone = LLM(str(tiny_llama), **ENGINE)
    expected = dict(zip(prompts, (o.token_ids for o in alone.generate(
        list(prompts.values()), PARAMS)), strict=True))

    shared = SharedLLM(LLM(str(tiny_llama), **ENGINE))
    halves = [dict(list(prompts.items())[:6]), dict(list(prompts.items())[6:])]
    clients = [shared.client(), shared.client()]
    results: list[dict] = [{}, {}]
    # Else one thread may drain its stream before the other starts, one after the other.
    all_added = threading.Barrier(2)

    def run(i: int) -> None:
        results[i] = _drain(clients[i], halves[i], all_added)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results[0] | results[1] == expected
    stats = shared.llm.stats()
    # One engine ran both: fewer steps than the two streams would take one after the other.
    assert stats["steps"] < 2 * alone.stats()["steps"]
    assert all(c.busy_seconds > 0 for c in clients)


def test_aborts_and_failures_reach_their_own_stream(tiny_llama, make_prompt):
    shared = SharedLLM(LLM(str(tiny_llama), **ENGINE))
    mine, theirs = shared.client(), shared.client()
    mine.add_request("a", make_prompt(10, seed=1), PARAMS)
    theirs.add_request("b", make_prompt(10, seed=2), PARAMS)
    theirs.abort_request("a")  # not theirs: ignored
    mine.abort_request("a")
    [aborted] = mine.step()
    assert (aborted.request_id, aborted.finish_reason) == ("a", "aborted")

    failure = RuntimeError("out of memory")
    original = shared.llm.runner.run

    def failing(*args, **kwargs):
        raise failure

    shared.llm.runner.run = failing
    mine.add_request("c", make_prompt(10, seed=3), PARAMS)
    with pytest.raises(RuntimeError):
        mine.step()
    shared.llm.runner.run = original
    with pytest.raises(RuntimeError):  # theirs had a request in the failed step
        theirs.step()
    # "b" and "c" were in it, one each.
    assert (mine.others_in_failed_step, theirs.others_in_failed_step) == (1, 1)
    mine.abort_request("c")
    theirs.abort_request("b")
    assert [o.request_id for o in mine.step()] == ["c"]
    assert [o.request_id for o in theirs.step()] == ["b"]
