"""Structured outputs through the engine's own loop: every finished output satisfies its
constraint, beside unconstrained requests that are not changed by them."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "minItems": 1, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "tags", "ok"]}
REGEX = r"[a-z]{2,4}-[0-9]{2}"
CHOICES = ["yes", "no", "not sure"]


def constraints() -> list[StructuredOutputsParams]:
    return [StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(regex=REGEX),
            StructuredOutputsParams(choice=CHOICES)]


def check(params: StructuredOutputsParams, text: str) -> None:
    if params.kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif params.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


@pytest.mark.parametrize("model", ["tiny_llama", "stories260k"])
def test_every_finished_output_satisfies_its_constraint(model, request):
    llm = LLM(str(request.getfixturevalue(model)), dtype="float32", device="cpu",
              kv_cache_memory="16MiB")
    kinds = constraints()
    params = [SamplingParams(max_tokens=96, temperature=1.0, seed=i,
                             structured_outputs=kinds[i % 3]) for i in range(24)]
    outputs = llm.generate(["Once upon a time"] * len(params), params)
    finished = 0
    for out, p in zip(outputs, params, strict=True):
        assert out.finish_reason in ("stop", "length"), out.error
        if out.finish_reason == "stop":
            check(p.structured_outputs, out.text)
            finished += 1
    # Choices and the regex always finish well within the budget.
    assert finished >= 16
    compiler = llm._constrained.compiler
    assert (compiler.compilations, compiler.cache_hits) == (3, 21)


def test_unconstrained_neighbours_are_unchanged_and_logprobs_stay_raw(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="16MiB")
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    alone = llm.generate(["the cat saw", "a big dog"], plain)
    constrained = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0,
                                 structured_outputs=StructuredOutputsParams(choice=CHOICES))
    mixed = llm.generate(["the cat saw", "x", "a big dog"], [plain, constrained, plain])
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    assert mixed[1].text in CHOICES
    # The mask forces tokens the raw distribution does not rank first: logprobs are the
    # model's own (before the mask), so some sampled token ranks below the top.
    ranks = [entry[token].rank for token, entry in
             zip(mixed[1].token_ids, mixed[1].outputs[0].logprobs, strict=True)]
    assert max(ranks) > 1


def test_a_spec_is_checked_when_it_is_made():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError):
        StructuredOutputsParams(regex="(unclosed")
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": SCHEMA})
