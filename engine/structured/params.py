"""What a request's output must satisfy: vLLM's StructuredOutputsParams.

Free of torch: jobs build one per row at submit, and a bad spec fails there. The spec is
checked by the grammar library itself (llguidance imports neither torch nor numpy), once
per distinct spec: a million rows sharing a schema cost one check and a cache lookup each.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar")

# Compact JSON on one line, spaced as json.dumps spaces it: whitespace a model may emit
# at will would let a weak one pad its output until max_tokens.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,  # a keyword llguidance cannot enforce is an error, not ignored
}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of:

    json     a JSON schema (dict, or its JSON text). Objects allow only the properties
             they list unless they say otherwise (additionalProperties), as vLLM's
             default backend does; properties come in the schema's order.
    regex    a regular expression (Rust regex syntax) the whole output matches
    choice   a list of strings; the output is one of them
    grammar  a context-free grammar: GBNF/EBNF (`root ::= ...`) or Lark (`start: ...`)

    ValueError, with the library's reason, for a spec that is malformed or uses a
    feature it cannot enforce.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # The llguidance grammar the spec compiles from: also the compile cache's key.
    _grammar: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams takes exactly one of json, regex, choice, grammar; "
                f"got {', '.join(given) or 'none'}"
            )
        kind = given[0]
        object.__setattr__(self, "_grammar", _grammar_of(kind, _canonical(kind, getattr(self, kind))))

    @property
    def kind(self) -> str:
        """Which of json, regex, choice, grammar is set."""
        return next(kind for kind in _KINDS if getattr(self, kind) is not None)

    @property
    def key(self) -> str:
        """The normalized spec (a grammar text): equal specs have equal keys."""
        return self._grammar


def _canonical(kind: str, value: Any) -> str:
    """The spec as text, checked for type: what _grammar_of caches on."""
    if kind == "json":
        schema = value
        if isinstance(value, str):
            try:
                schema = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured outputs json: not valid JSON text: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(
                "structured outputs json must be a JSON schema object (a dict or its JSON "
                f"text), got {type(schema).__name__}"
            )
        # Key order is kept: it is the order of the properties in the output.
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise ValueError("structured outputs choice must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in value):
            raise ValueError(f"structured outputs choices must be non-empty strings, got {value!r}")
        return json.dumps(list(value), ensure_ascii=False)
    if not isinstance(value, str) or not value:
        raise ValueError(f"structured outputs {kind} must be a non-empty string, got {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _grammar_of(kind: str, text: str) -> str:
    """The llguidance grammar for a canonical spec, checked by llguidance itself."""
    import llguidance

    matcher = llguidance.LLMatcher
    try:
        if kind == "json":
            schema = _closed_objects(json.loads(text))
            grammar = matcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(text)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", json.loads(text))
        else:  # GBNF is converted to Lark; Lark passes as it is
            grammar = llguidance.grammar_from("grammar", text)
    except ValueError as exc:
        raise ValueError(f"structured outputs {kind}: {_one_line(str(exc))}") from None
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"structured outputs {kind}: {_one_line(messages[0])}")
    return grammar


def _one_line(message: str) -> str:
    """llguidance's message without its multi-line source excerpt: the reason is one line
    in an errors file and on a command line."""
    return " ".join(message.split())


# Where JSON Schema keeps subschemas: one, a list of them, or a map of names to them.
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where every object schema that lists properties and says nothing of others
    allows no others (vLLM's rule for llguidance; xgrammar's strict mode does the same):
    a model, random weights above all, otherwise invents keys until max_tokens."""
    schema = copy.deepcopy(schema)
    pending = [schema]
    while pending:
        node = pending.pop()
        if not isinstance(node, dict):  # true / false schemas
            continue
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        pending.extend(node[k] for k in _SUBSCHEMA if k in node)
        for k in _SUBSCHEMA_LISTS:
            if isinstance(node.get(k), list):
                pending.extend(node[k])
        for k in _SUBSCHEMA_MAPS:
            if isinstance(node.get(k), dict):
                pending.extend(node[k].values())
    return schema
