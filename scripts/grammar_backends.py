"""Measure the grammar libraries vLLM uses (xgrammar, llguidance) with our tokenizers.

For each tokenizer and library: the one-off tokenizer setup; per distinct spec (three JSON
schemas, three regexes, two choice lists, one EBNF grammar) the time from spec to a matcher
ready for its first mask, and what each further request with that spec costs; then a
decode at --rows constrained rows: per step, filling every row's mask (the library's own
batched, threaded call), sampling from masked random logits, accepting. A row whose
matcher terminates starts over, so every step has --rows constrained rows. Then applying
--rows masks to logits (engine.structured's apply_token_bitmask, xgrammar's CPU kernel),
and a JSON Schema conformance check: schemas with instances that the `jsonschema`
package judges; a library either refuses a schema or should accept exactly its valid
instances (accepting an invalid one is the failure that matters: output that breaks the
schema).

The llguidance side goes through engine.structured (what the engine ships: its JSON
options, closed objects); xgrammar is called as vLLM calls it (strict mode, compact JSON).

    python scripts/grammar_backends.py [--rows 256] [--steps 32] [--tokenizers tiny-bpe,...]

Prints one JSON object (CPU model, flags and thread count included). Tokenizers:
  tiny-bpe     the random test models' byte-level BPE (scripts/make_tiny_model.py), 384
  stories260K  ../shared/models/stories260K, SentencePiece with byte fallback, 512
  bpe-32k      a byte-level BPE of 32,000 trained here on the standard library's sources
               (the `small` shape's own tokenizer learns only ~1,560 tokens from its corpus)
  sp-32k       a SentencePiece-style BPE (Metaspace, byte fallback) of 32,000, likewise
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a file: make `scripts` and `engine` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from engine.structured import GrammarCompiler, StructuredOutputsParams  # noqa: E402
from engine.structured.bitmask import apply_token_bitmask  # noqa: E402
from engine.structured.params import _grammar_of  # noqa: E402

# Distinct specs, as a batch job's rows would bring them: (kind, spec).
SPECS: dict[str, tuple[str, Any]] = {
    "json_person": ("json", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                     "minItems": 1, "maxItems": 4},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                               "country": {"enum": ["US", "FR", "DE"]}},
                "required": ["city", "country"],
            },
        },
        "required": ["name", "age", "role", "tags", "address"],
    }),
    "json_order": ("json", {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "minLength": 3, "maxLength": 8},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                               "price": {"type": "number"}},
                "required": ["sku", "qty"]}},
            "status": {"enum": ["open", "paid", "shipped"]},
            "note": {"anyOf": [{"type": "string", "maxLength": 50}, {"type": "null"}]},
        },
        "required": ["id", "lines", "status"],
    }),
    "json_label": ("json", {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "reasons": {"type": "array", "items": {"type": "string", "maxLength": 40},
                        "maxItems": 3},
            "flagged": {"type": "boolean"},
        },
        "required": ["label", "confidence", "flagged"],
    }),
    "regex_date": ("regex", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    "regex_email": ("regex", r"[a-z0-9._]{1,16}@[a-z]{1,12}\.(com|org|net)"),
    "regex_phone": ("regex", r"\(\d{3}\) \d{3}-\d{4}"),
    "choice_sentiment": ("choice", ["positive", "negative", "neutral"]),
    "choice_yes_no": ("choice", ["yes", "no", "not sure"]),
    "grammar_arith": ("grammar", 'root ::= expr\nexpr ::= term ("+" term)*\n'
                                 'term ::= [0-9]+ | "(" expr ")"'),
}


TOKENIZERS = ("tiny-bpe", "stories260K", "bpe-32k", "sp-32k")
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "avx_vnni", "amx_tile", "neon", "asimd", "sve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads each library may use for compiling and batched masks")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": _machine(),
        "threads": args.threads,
        "rows": args.rows,
        "steps": args.steps,
        "versions": {name: version(name) for name in ("xgrammar", "llguidance", "torch")},
        "results": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.tokenizers.split(","):
            tokenizer = _tokenizer(name, Path(scratch))
            # Models' logits are often wider than the tokenizer (padded to a multiple of 64).
            vocab_size = -(-len(tokenizer) // 64) * 64
            entry: dict[str, Any] = {"tokenizer_vocab": len(tokenizer), "logits_width": vocab_size}
            for backend_cls in (Xgrammar, Llguidance):
                backend = backend_cls(tokenizer, vocab_size, args.threads)
                entry[backend.name] = _measure(backend, vocab_size, args)
            entry["apply_ms"] = _apply(vocab_size, args.rows)
            report["results"][name] = entry
            if name == "tiny-bpe":
                report["json_schema_conformance"] = _conformance(tokenizer, vocab_size)
            print(f"{name}: done", file=sys.stderr)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


class Xgrammar:
    """Compile once per spec (token masks precomputed), a cheap matcher per request."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.setup_s, info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id]))
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "choice":
            return self.compiler.compile_grammar(_choice_ebnf(spec))
        return self.compiler.compile_grammar(spec)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.accept_token(token_id)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


class Llguidance:
    """engine.structured: a spec becomes a grammar text at once, its first matcher builds
    the lexer lazily, later requests copy that matcher."""

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        self.setup_s, self.compiler = _timed(lambda: GrammarCompiler(
            tokenizer, vocab_size, [tokenizer.eos_token_id], num_threads=threads))

    def compile(self, kind: str, spec: Any) -> Any:
        # Measure a cold start: the spec check's cache and the compiler's templates emptied.
        _grammar_of.cache_clear()
        self.compiler._templates.clear()
        params = StructuredOutputsParams(**{kind: spec})
        self.compiler.matcher(params)
        return params

    def matcher(self, params: Any) -> Any:
        return self.compiler.matcher(params)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.compiler.fill_bitmasks(matchers, bitmask)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.accept(token_id)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


def _measure(backend: Any, vocab_size: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"tokenizer_setup_ms": 1e3 * backend.setup_s, "specs": {}}
    compiled = {}
    bitmask = torch.full((1, -(-vocab_size // 32)), -1, dtype=torch.int32)
    for name, (kind, spec) in SPECS.items():
        # Spec to first mask: that is where llguidance does its (lazy) work.
        def first_mask(kind: str = kind, spec: Any = spec) -> Any:
            grammar = backend.compile(kind, spec)
            backend.fill([backend.matcher(grammar)], bitmask)
            return grammar

        times = []
        for _ in range(3):
            seconds, compiled[name] = _timed(first_mask)
            times.append(seconds)
        request_s, _ = _timed(lambda g=compiled[name]: [backend.matcher(g) for _ in range(100)])
        result["specs"][name] = {
            "kind": kind,
            "spec_to_first_mask_ms": 1e3 * statistics.median(times),
            "per_request_matcher_us": 1e4 * request_s,
        }
    json_names = [n for n, (kind, _) in SPECS.items() if kind == "json"]
    result["decode_json"] = _decode(backend, [compiled[n] for n in json_names], vocab_size, args)
    result["decode_mixed"] = _decode(backend, list(compiled.values()), vocab_size, args)
    return result


def _decode(backend: Any, grammars: list[Any], vocab_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """--steps decode steps at --rows constrained rows, cycling over the grammars."""
    generator = torch.Generator().manual_seed(0)
    matchers = [backend.matcher(grammars[i % len(grammars)]) for i in range(args.rows)]
    bitmask = torch.full((args.rows, -(-vocab_size // 32)), -1, dtype=torch.int32)
    fill, accept, completed = [], [], 0
    for _ in range(args.steps):
        logits = torch.randn(args.rows, vocab_size, generator=generator)
        fill.append(_timed(lambda: backend.fill(matchers, bitmask))[0])
        apply_token_bitmask(logits, bitmask, list(range(args.rows)))
        tokens = torch.softmax(logits, dim=-1).multinomial(1, generator=generator).squeeze(1).tolist()
        start = time.perf_counter()
        for i, token in enumerate(tokens):
            if not backend.accept(matchers[i], token):
                raise RuntimeError(f"{backend.name} rejected a token its own mask allowed")
            if backend.done(matchers[i]):
                completed += 1
                matchers[i] = backend.matcher(grammars[i % len(grammars)])
        accept.append(time.perf_counter() - start)
    return {
        "fill_ms": _summary(fill),
        "accept_ms": _summary(accept),
        "fill_us_per_row": 1e6 * statistics.mean(fill) / args.rows,
        "completed_outputs": completed,
    }


def _apply(vocab_size: int, rows: int) -> dict[str, dict[str, float]]:
    """Masking rows x vocab_size random logits with random masks: 10 runs of each way."""
    import xgrammar

    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31, (rows, -(-vocab_size // 32)), dtype=torch.int32,
                            generator=generator)
    logits = torch.randn(rows, vocab_size, generator=generator)
    every, half = list(range(rows)), list(range(0, rows, 2))
    ways = {
        "engine_all_rows": lambda x: apply_token_bitmask(x, bitmask, every),
        "engine_half_rows": lambda x: apply_token_bitmask(x, bitmask[: len(half)], half),
        "xgrammar_cpu_all_rows": lambda x: xgrammar.apply_token_bitmask_inplace(x, bitmask),
    }
    result = {}
    for name, way in ways.items():
        times = []
        for _ in range(10):
            target = logits.clone()
            times.append(_timed(lambda way=way, target=target: way(target))[0])
        result[name] = _summary(times) | {"min": 1e3 * min(times)}
    return result


# Schemas, and instances (compact JSON as both libraries are set to write it) that the
# jsonschema package judges: each library refuses the schema or should accept exactly
# the valid instances. No instance has properties a schema does not list (both close
# objects by design).
CONFORMANCE: list[tuple[dict[str, Any], list[str]]] = [
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"a"', '"abcd"']),
    ({"type": "integer", "minimum": 1.5, "maximum": 3.5}, ["2", "1", "4"]),
    ({"type": ["integer", "null"]}, ["1", "null", '"x"']),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, ["1", '"ab"', '"abc"']),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, ["[1]", "[1, 2]"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
     ['{"a": 1}', "{}"]),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["[1, 2]", "[1, 1]"]),
    ({"type": "number", "multipleOf": 0.5}, ["1.5", "1.25"]),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, ['"ab"', '"abcdef"']),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 5}, ["7", "1"]),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, ["7", "1"]),
    ({"type": "integer", "enum": [1, "x"]}, ["1", '"x"']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
     ['{"a": 1}']),
    ({"enum": [{"a": 1}, [1, 2]]}, ['{"a": 1}', "[1, 2]", "[1]"]),
    ({"const": {"a": [1]}}, ['{"a": [1]}', '{"a": [2]}']),
    ({"not": {"type": "string"}}, ["1", '"x"']),
    ({"type": "array", "contains": {"type": "integer"}}, ["[1]", '["x"]']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, ['{"a": 1}', '{"a": 1, "b": 2}']),
    ({"if": {"type": "string"}, "then": {"minLength": 2}}, ['"a"', '"ab"']),
    ({"type": "string", "format": "date", "maxLength": 3}, ['"2020-01-01"']),
    ({"type": "string", "format": "no-such-format"}, ['"x"']),
]


def _conformance(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Per library: schemas refused, and those compiled that accept an invalid instance
    (unsound) or refuse a valid one (incomplete)."""
    import jsonschema
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    xgr_compiler = xgr.GrammarCompiler(info, max_threads=1)
    compiler = GrammarCompiler(tokenizer, vocab_size, [tokenizer.eos_token_id])

    def xgrammar_accepts(schema: dict[str, Any]) -> Callable[[str], bool]:
        compiled = xgr_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

        def accepts(text: str) -> bool:
            matcher = xgr.GrammarMatcher(compiled)
            return matcher.accept_string(text) and matcher.is_completed()
        return accepts

    def llguidance_accepts(schema: dict[str, Any]) -> Callable[[str], bool]:
        params = StructuredOutputsParams(json=schema)

        def accepts(text: str) -> bool:
            matcher = compiler.matcher(params)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return all(matcher.accept(t) for t in ids) and matcher.is_complete()
        return accepts

    summary: dict[str, Any] = {}
    for library, build in (("xgrammar", xgrammar_accepts), ("llguidance", llguidance_accepts)):
        refused, unsound, incomplete = [], [], []
        for schema, instances in CONFORMANCE:
            label = json.dumps(schema)
            try:
                accepts = build(schema)
            except (ValueError, RuntimeError):
                refused.append(label)
                continue
            for text in instances:
                valid = jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
                if accepts(text) != valid:
                    (unsound if not valid else incomplete).append(f"{label} {text}")
        summary[library] = {
            "schemas": len(CONFORMANCE), "refused": len(refused),
            "accepts_invalid": unsound, "rejects_valid": incomplete,
        }
    return summary


def _tokenizer(name: str, scratch: Path) -> Any:
    from transformers import AutoTokenizer

    if name == "tiny-bpe":
        from scripts.make_tiny_model import make_tiny_model

        return AutoTokenizer.from_pretrained(make_tiny_model(scratch / "tiny"))
    if name == "stories260K":
        return AutoTokenizer.from_pretrained(REPO_ROOT.parent / "shared" / "models" / "stories260K")
    if name in ("bpe-32k", "sp-32k"):
        return _trained_tokenizer(byte_level=name == "bpe-32k")
    raise SystemExit(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")


def _trained_tokenizer(byte_level: bool) -> Any:
    """A 32,000-token tokenizer trained on the standard library's sources (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if byte_level:
        specials = ["<pad>", "<s>", "</s>"]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama-2 style, as stories260K's: "▁" for spaces, other bytes as <0xNN> tokens
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(" ", 1, 0)])
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train(files, trainer)
    if not byte_level:
        # The byte tokens were reserved as specials to get ids 3..258; they are plain
        # vocabulary in a SentencePiece tokenizer (decoders must not skip them).
        data = json.loads(tokenizer.to_str())
        data["added_tokens"] = data["added_tokens"][:3]
        tokenizer = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1e3 * s for s in seconds)
    return {"mean": statistics.mean(ms), "p50": ms[len(ms) // 2], "p90": ms[int(len(ms) * 0.9)]}


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_model": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first processor's entries
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["cpu_model"] = fields.get("model name", info["cpu_model"])
    # Virtual machines often name only the line ("AMD EPYC"): family and model say which.
    info["cpu_family_model_stepping"] = [fields.get(k) for k in ("cpu family", "model", "stepping")]
    flags = set(fields.get("flags", "").split())
    info["simd_flags"] = [flag for flag in SIMD_FLAGS if flag in flags]
    return info


if __name__ == "__main__":
    sys.exit(main())
