"""Grammar-constrained decoding: outputs that always satisfy a JSON schema, a regular
expression, a list of choices or an EBNF grammar (vLLM's StructuredOutputsParams).

The grammar library is llguidance (scripts/grammar_backends.py measures it against
xgrammar): it follows JSON Schema's semantics or says what it cannot enforce, builds
its lexer lazily (a new spec costs about a millisecond, whatever the vocabulary) and
has no dependencies. Per step, for the sequences that have a matcher:

    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)   # once per engine
    matcher = compiler.matcher(params)           # per request; ValueError for a bad spec
    compiler.fill_bitmasks(matchers, bitmask)    # CPU, threaded; bitmask[i] for matchers[i]
    apply_token_bitmask(logits, bitmask[: len(rows)], rows)   # before sampling
    matcher.accept(token_id); matcher.is_terminated()

Names are imported on first use (PEP 562): StructuredOutputsParams is torch-free, so
jobs can validate specs at submit without pulling torch in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_attributes

if TYPE_CHECKING:
    from engine.structured.bitmask import allocate_token_bitmask, apply_token_bitmask
    from engine.structured.compiler import GrammarCompiler, StructuredMatcher
    from engine.structured.params import StructuredOutputsParams

__all__ = [
    "GrammarCompiler",
    "StructuredMatcher",
    "StructuredOutputsParams",
    "allocate_token_bitmask",
    "apply_token_bitmask",
]

_MODULES = {
    "GrammarCompiler": "engine.structured.compiler",
    "StructuredMatcher": "engine.structured.compiler",
    "StructuredOutputsParams": "engine.structured.params",
    "allocate_token_bitmask": "engine.structured.bitmask",
    "apply_token_bitmask": "engine.structured.bitmask",
}


__getattr__ = lazy_attributes(__name__, _MODULES)
