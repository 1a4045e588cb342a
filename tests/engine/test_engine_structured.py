"""Structured outputs (engine/structured) on their own, without the engine loop.

Random logits stand in for a random-weight model: each step fills the constrained rows'
masks, applies them, samples (greedy or at random) and accepts, as the engine will. Every
output that completes must decode to text that satisfies its spec; one cut by the token
budget must be a prefix of such text; EOS must be masked out until the output is complete.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from engine.stopping import IncrementalDetokenizer
from engine.structured import (
    GrammarCompiler,
    StructuredOutputsParams,
    allocate_token_bitmask,
    apply_token_bitmask,
)

SCHEMAS = [
    {  # nested object, enums, bounded arrays and strings, required and optional fields
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                     "minItems": 1, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                               "country": {"enum": ["US", "FR", "DE"]}},
                "required": ["city", "country"],
            },
        },
        "required": ["name", "age", "role", "tags", "address"],
    },
    {  # an array of objects, a nullable field, numbers in a range
        "type": "object",
        "properties": {
            "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "minLength": 3, "maxLength": 5},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["sku", "qty"]}},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
            "ok": {"type": "boolean"},
        },
        "required": ["lines", "score", "note", "ok"],
    },
    {"type": "array", "items": {"enum": [1, 2, "three", None]}, "minItems": 2, "maxItems": 4},
]
REGEXES = [
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"[a-z]{1,8}@[a-z]{1,6}\.(com|org)",
    r"(yes|no)( because [a-z ]{1,10})?",
]
CHOICES = [
    ["positive", "negative", "neutral"],
    ["yes", "yesterday", "no"],  # one is a prefix of another: EOS decides
    ['a "quoted" \\ line\n', "é ü 日本"],  # escapes and non-ASCII
]
PROMPT = "Once upon a time"


def all_specs() -> list[StructuredOutputsParams]:
    return (
        [StructuredOutputsParams(json=s) for s in SCHEMAS]
        + [StructuredOutputsParams(regex=r) for r in REGEXES]
        + [StructuredOutputsParams(choice=c) for c in CHOICES]
        + [StructuredOutputsParams(grammar='root ::= "(" [0-9]+ (" + " [0-9]+){0,2} ")"')]
    )


def check_text(params: StructuredOutputsParams, text: str) -> None:
    """text satisfies params: checked without the grammar library."""
    if params.json is not None:
        jsonschema.validate(json.loads(text), params.json)
    elif params.regex is not None:
        assert re.fullmatch(params.regex, text), (params.regex, text)
    elif params.choice is not None:
        assert text in params.choice, (params.choice, text)
    else:
        assert re.fullmatch(r"\(\d+( \+ \d+){0,2}\)", text), text


@pytest.fixture(scope="module", params=["byte-level-bpe", "stories260K"])
def tokenizer(request, tiny_llama):
    if request.param == "stories260K":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("stories260k"))
    return AutoTokenizer.from_pretrained(tiny_llama)


def padded(tokenizer) -> int:
    """A logits width past the tokenizer's vocabulary, as models pad it (to 64)."""
    return -(-(len(tokenizer) + 1) // 64) * 64


class Decode:
    """Rows of constrained sequences decoded together over random logits, as the engine
    will step them; unconstrained rows ride along in the logits untouched."""

    def __init__(self, tokenizer, compiler: GrammarCompiler, specs, seed: int, greedy: bool):
        self.tokenizer, self.compiler, self.specs = tokenizer, compiler, specs
        self.eos = tokenizer.eos_token_id
        self.matchers = [compiler.matcher(p) for p in specs]
        self.tokens: list[list[int]] = [[] for _ in specs]
        self.generator = torch.Generator().manual_seed(seed)
        self.greedy = greedy
        self.bitmask = allocate_token_bitmask(len(specs), compiler.vocab_size)

    def run(self, budget: int, bias: torch.Tensor | None = None) -> None:
        """Up to budget tokens per row, ending a row where its matcher terminates."""
        vocab = self.compiler.vocab_size
        for _ in range(budget):
            live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
            if not live:
                return
            # Unconstrained rows between the constrained ones: 2 * i + 1 for row i.
            logits = 3 * torch.randn(2 * len(self.specs) + 1, vocab, generator=self.generator)
            if bias is not None:
                logits += bias
            rows = [2 * i + 1 for i in live]
            before = logits.clone()
            bitmask = self.bitmask[: len(live)]
            self.compiler.fill_bitmasks([self.matchers[i] for i in live], bitmask)
            apply_token_bitmask(logits, bitmask, rows)
            free = [r for r in range(logits.shape[0]) if r not in rows]
            assert torch.equal(logits[free], before[free])
            for k, (i, row) in enumerate(zip(live, rows, strict=True)):
                matcher = self.matchers[i]
                eos_allowed = bool((bitmask[k, self.eos // 32] >> (self.eos % 32)) & 1)
                assert eos_allowed == matcher.is_complete(), "EOS allowed exactly when complete"
                assert torch.isinf(logits[row, len(self.tokenizer) :]).all()  # padding ids
                token = self._choose(logits[row])
                assert matcher.accept(token)
                if token != self.eos:
                    self.tokens[i].append(token)

    def _choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        return int(torch.softmax(logits, -1).multinomial(1, generator=self.generator))

    def text(self, i: int) -> str:
        """As the engine's detokenizer spells it after the prompt."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, self.tokenizer(PROMPT)["input_ids"])
        for token in self.tokens[i]:
            detokenizer.append(token, read=False)
        detokenizer.flush()
        return detokenizer.text


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "random"])
def test_completed_outputs_satisfy_their_spec(tokenizer, greedy):
    compiler = GrammarCompiler(tokenizer, padded(tokenizer), [tokenizer.eos_token_id])
    specs = all_specs() * 4  # four rows per spec, each its own walk
    decode = Decode(tokenizer, compiler, specs, seed=int(greedy), greedy=greedy)
    decode.run(budget=300)
    completed = [i for i, m in enumerate(decode.matchers) if m.is_terminated()]
    assert len(completed) >= 0.9 * len(specs)
    for i in completed:
        check_text(specs[i], decode.text(i))
    # One compilation per distinct spec, whatever the number of rows.
    assert compiler.compilations == len(all_specs())
    assert compiler.cache_hits == len(specs) - len(all_specs())


def test_a_budget_cut_leaves_a_valid_prefix(tokenizer):
    """Cut after a few tokens, then continue from there towards the end (closing quotes
    and brackets and EOS favoured): the cut text begins an output that satisfies the spec."""
    compiler = GrammarCompiler(tokenizer, padded(tokenizer), [tokenizer.eos_token_id])
    specs = all_specs()
    decode = Decode(tokenizer, compiler, specs, seed=2, greedy=False)
    decode.run(budget=6)
    cut = [i for i, m in enumerate(decode.matchers) if not m.is_terminated()]
    assert len(cut) >= len(specs) // 2
    prefixes = {i: decode.text(i) for i in cut}
    closing = torch.zeros(compiler.vocab_size)
    for token in range(len(tokenizer)):
        if any(c in tokenizer.decode([token]) for c in "\"]})"):
            closing[token] = 4.0
    closing[tokenizer.eos_token_id] = 8.0
    decode.run(budget=400, bias=closing)
    for i in cut:
        assert decode.matchers[i].is_terminated()
        text = decode.text(i)
        check_text(specs[i], text)
        # A prefix, save a last character the cut split (decoded as U+FFFD).
        assert text.startswith(prefixes[i].removesuffix("\ufffd")), (prefixes[i], text)


def char_tokens(tokenizer, text: str) -> list[int]:
    """One token per (ASCII) character: its own piece, else its byte-fallback token."""
    vocab = tokenizer.get_vocab()
    return [vocab.get(c, vocab.get(f"<0x{ord(c):02X}>")) for c in text]


def eos_bit(bitmask_row: torch.Tensor, eos: int) -> bool:
    return bool((bitmask_row[eos // 32] >> (eos % 32)) & 1)


def test_eos_only_after_a_complete_choice(tokenizer):
    eos = tokenizer.eos_token_id
    compiler = GrammarCompiler(tokenizer, padded(tokenizer), [eos])
    matcher = compiler.matcher(StructuredOutputsParams(choice=["yes", "yesterday"]))
    bitmask = allocate_token_bitmask(1, compiler.vocab_size)
    for token in char_tokens(tokenizer, "yes"):
        matcher.fill_mask(bitmask[0])
        assert not eos_bit(bitmask[0], eos) and not matcher.is_complete()
        assert matcher.accept(token)
    assert matcher.is_complete() and not matcher.is_terminated()  # "yesterday" may follow
    matcher.fill_mask(bitmask[0])
    assert eos_bit(bitmask[0], eos)
    assert matcher.accept(eos)
    assert matcher.is_terminated()
    # A token outside the grammar is refused.
    other = compiler.matcher(StructuredOutputsParams(choice=["yes", "yesterday"]))
    assert not other.accept(eos)


def test_padding_ids_past_the_tokenizer_are_never_allowed(tokenizer):
    vocab = padded(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    bitmask = allocate_token_bitmask(1, vocab)
    compiler.matcher(StructuredOutputsParams(regex=r"[a-z ]{0,20}")).fill_mask(bitmask[0])
    logits = torch.zeros(1, vocab)
    apply_token_bitmask(logits, bitmask, [0])
    assert torch.isinf(logits[0, len(tokenizer) :]).all()
    assert (logits[0, : len(tokenizer)] == 0).sum() > 10  # letters, spaces, EOS


def test_compile_cache_is_keyed_by_the_normalized_spec(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=2)
    schema = SCHEMAS[0]
    for _ in range(50):  # the same schema, as a dict and as JSON text
        compiler.matcher(StructuredOutputsParams(json=schema))
        compiler.matcher(StructuredOutputsParams(json=json.dumps(schema, indent=2)))
    assert (compiler.compilations, compiler.cache_hits) == (1, 99)
    # Property order is the output's order: a different schema.
    reordered = {**schema, "properties": dict(reversed(schema["properties"].items()))}
    compiler.matcher(StructuredOutputsParams(json=reordered))
    assert compiler.compilations == 2
    # Beyond cache_size distinct specs, the least recently used is built again.
    compiler.matcher(StructuredOutputsParams(regex="a+"))
    compiler.matcher(StructuredOutputsParams(json=schema))
    assert (compiler.compilations, compiler.cache_hits) == (4, 99)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of json, regex, choice, grammar; got none"),
        ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "strin"),
        ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum"),
        ({"json": {"type": "string", "format": "no-such-format"}}, "no-such-format"),
        ({"json": '{"type": "object",'}, "not valid JSON"),
        ({"json": [{"type": "object"}]}, "JSON schema object"),
        ({"regex": "[a-z"}, "unclosed character class"),
        ({"regex": "(?=a)a"}, "look-around"),
        ({"regex": ""}, "non-empty string"),
        ({"choice": []}, "non-empty list"),
        ({"choice": "yes"}, "non-empty list"),
        ({"choice": ["yes", ""]}, "non-empty strings"),
        ({"grammar": 'root ::= "a" | undefined'}, "undefined"),
    ],
)
def test_a_bad_spec_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(**kwargs)


def test_masks_span_a_tokenizer_wider_than_the_logits(tiny_llama):
    """Added tokens past the model's vocabulary: the mask covers them, apply ignores them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    narrow = len(tokenizer) - 5
    compiler = GrammarCompiler(tokenizer, narrow, [tokenizer.eos_token_id])
    assert compiler.vocab_size == len(tokenizer)
    bitmask = allocate_token_bitmask(1, compiler.vocab_size)
    compiler.matcher(StructuredOutputsParams(choice=["no"])).fill_mask(bitmask[0])
    logits = torch.zeros(1, narrow)
    apply_token_bitmask(logits, bitmask, [0])
    assert 0 < int((logits == 0).sum()) < 10
    with pytest.raises(ValueError, match="bitmask"):
        compiler.fill_bitmasks([], torch.zeros(1, 3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["numpy", "torch"])
def test_apply_token_bitmask_matches_a_bit_by_bit_reference(dtype):
    """float32 CPU logits take the numpy path; others the torch one GPUs take."""
    generator = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word's high bits are ignored
    bitmask = torch.randint(-(2**31), 2**31, (11, 32), dtype=torch.int32, generator=generator)
    logits = torch.randn(13, vocab, generator=generator).to(dtype)
    rows = [12, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # chunks of 8: scattered, then consecutive
    expected = logits.clone()
    for i, row in enumerate(rows):
        for token in range(vocab):
            if not (int(bitmask[i, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="one row per constrained row"):
        apply_token_bitmask(logits, bitmask[:2], rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_token_bitmask_on_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31, (64, 1002), dtype=torch.int32, generator=generator)
    logits = torch.randn(100, 32050, generator=generator)
    rows = list(range(0, 100, 3))[:64]
    bitmask = bitmask[: len(rows)]
    on_gpu = logits.cuda()
    apply_token_bitmask(logits, bitmask, rows)
    apply_token_bitmask(on_gpu, bitmask, rows)
    assert torch.equal(on_gpu.cpu(), logits)


def test_params_import_neither_torch_nor_the_library_until_used():
    code = (
        "import sys\n"
        "from engine.structured import StructuredOutputsParams\n"
        "StructuredOutputsParams(choice=['a', 'b'])\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
