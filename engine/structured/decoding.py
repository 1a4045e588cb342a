"""Structured outputs inside the engine loop: a matcher per constrained request, the
step's masks on the logits it samples from, and when a constrained request ends.

Engines that never see a constrained request never build a compiler (converting a
tokenizer for llguidance costs a fraction of a second).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from engine.outputs import FinishReason
from engine.structured.bitmask import allocate_token_bitmask, apply_token_bitmask
from engine.structured.compiler import GrammarCompiler, StructuredMatcher
from engine.structured.params import StructuredOutputsParams


class ConstrainedDecoding:
    """One engine's grammar compiler and step bitmask, made on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 max_rows: int) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._eos_token_ids = frozenset(eos_token_ids)
        self._max_rows = max_rows
        self._compiler: GrammarCompiler | None = None
        self._bitmask: torch.Tensor | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._tokenizer, self._vocab_size,
                                             self._eos_token_ids)
        return self._compiler

    def matcher(self, params: StructuredOutputsParams | None) -> StructuredMatcher | None:
        """The request's matcher (None: unconstrained); ValueError for a spec this
        vocabulary cannot spell."""
        return None if params is None else self.compiler.matcher(params)

    def mask(self, raw: torch.Tensor, logits: torch.Tensor,
             matchers: list[StructuredMatcher | None]) -> torch.Tensor:
        """The logits to sample from, with every constrained row (matchers[i] set) masked
        to the tokens its grammar allows. raw (the model's logits, which logprobs report)
        is never written: logits is copied first where it is raw itself."""
        rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return logits
        if logits is raw:
            logits = logits.clone()
        if self._bitmask is None:
            self._bitmask = allocate_token_bitmask(self._max_rows, self.compiler.vocab_size)
        bitmask = self._bitmask[: len(rows)]
        self.compiler.fill_bitmasks([matchers[i] for i in rows], bitmask)
        apply_token_bitmask(logits, bitmask, rows)
        return logits

    def advance(self, matcher: StructuredMatcher, token_id: int) -> FinishReason | None:
        """Feed a sampled token; a reason when it ends the request at once: EOS (allowed
        only once the output is complete) or, under the mask never, a refused token."""
        if not matcher.accept(token_id):
            return FinishReason.ERROR
        return FinishReason.STOP if token_id in self._eos_token_ids else None
