"""Grammar matchers for one tokenizer: compiled once per distinct spec, one per request."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from engine.structured.bitmask import bitmask_width
from engine.structured.params import StructuredOutputsParams


class GrammarCompiler:
    """Matchers over one tokenizer's vocabulary, as wide as the model's logits (ids past
    the tokenizer's are padding, never allowed).

    A spec's first request builds its grammar (about a millisecond: llguidance builds
    its lexer lazily, as masks ask for it); later ones copy that matcher, sharing what it
    built. The last `cache_size` distinct specs are kept.

    Counters: compilations (specs built), cache_hits (requests that reused one).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = 256,
        num_threads: int | None = None,
    ) -> None:
        """tokenizer: the model's Hugging Face fast tokenizer; vocab_size: the width of
        the model's logits. eos_token_ids: the tokens that end a sequence, allowed exactly
        where the output is complete. num_threads: for fill_bitmasks (None: llguidance's
        default, most of the CPUs)."""
        eos = sorted(set(eos_token_ids))
        if not eos:
            raise ValueError("structured outputs need an EOS token to end a complete output")
        # Masks span the tokenizer where it has more tokens than the logits (added tokens
        # the model never emits): apply_token_bitmask ignores the ids past the logits.
        self.vocab_size = max(vocab_size, len(tokenizer))
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=self.vocab_size, eos_token=eos
            )
        except ValueError as exc:  # a slow (Python) tokenizer
            raise ValueError(f"structured outputs: {exc}") from None
        self.cache_size = cache_size
        self.compilations = 0
        self.cache_hits = 0
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor(num_threads)

    def matcher(self, params: StructuredOutputsParams) -> StructuredMatcher:
        """A fresh matcher for one request (ValueError where this vocabulary cannot
        spell the spec's output)."""
        key = params.key
        template = self._templates.get(key)
        if template is not None:
            self.cache_hits += 1
            self._templates.move_to_end(key)
        else:
            # Never advanced itself: each request gets a copy at the start state.
            template = llguidance.LLMatcher(self._tokenizer, key, log_level=0)
            if template.is_error():
                raise ValueError(f"structured outputs {params.kind}: {template.get_error()}")
            self.compilations += 1
            self._templates[key] = template
            if len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return StructuredMatcher(template.deep_copy(), self.vocab_size)

    def fill_bitmasks(self, matchers: Sequence[StructuredMatcher], bitmask: torch.Tensor) -> None:
        """bitmask[i] = the allowed next tokens of matchers[i], on several threads (the
        GIL is released): bitmask is a CPU int32 [rows >= len(matchers), width] tensor
        from allocate_token_bitmask."""
        _check_bitmask(bitmask, self.vocab_size, len(matchers))
        if not matchers:
            return
        self._executor.unsafe_compute_mask_ptr(
            [(m._matcher, i) for i, m in enumerate(matchers)],
            bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0],
        )


class StructuredMatcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into one CPU int32 row of a bitmask (bit t % 32
        of word t // 32 for token t). EOS is allowed only where the output is complete."""
        _check_bitmask(bitmask_row.unsqueeze(0), self.vocab_size, 1)
        self._matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the
        matcher then stays in error: a token sampled under its mask never is)."""
        return self._matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """Nothing more can follow: EOS was accepted, or the output is complete and only
        EOS would be allowed next."""
        return self._matcher.is_stopped()

    def is_complete(self) -> bool:
        """The output so far satisfies the spec (EOS would be accepted)."""
        return self._matcher.is_accepting()


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int, rows: int) -> None:
    """llguidance writes through a raw pointer: the memory must be what it expects."""
    width = bitmask_width(vocab_size)
    if (
        bitmask.dtype != torch.int32 or bitmask.device.type != "cpu"
        or not bitmask.is_contiguous() or bitmask.dim() != 2
        or bitmask.shape[1] != width or bitmask.shape[0] < rows
    ):
        raise ValueError(
            f"bitmask must be a contiguous CPU int32 tensor of at least {rows} rows of "
            f"{width} words, got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}"
        )
