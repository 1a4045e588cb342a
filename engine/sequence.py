"""The state of one request as it moves through the engine."""

from __future__ import annotations

import enum

import torch

from engine.outputs import CompletionOutput, FinishReason, PromptLogprobs, SampleLogprobs
from engine.sampling_params import SamplingParams
from engine.stopping import IncrementalDetokenizer
from engine.structured.compiler import StructuredMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        detokenizer: IncrementalDetokenizer,
        sample_index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.sample_index = sample_index  # which of the request's n samples this is
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        # Tokens whose K/V are in the cache; the rest are computed by coming steps.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix-cache hash of each full block of token_ids, filled in as blocks fill up.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.cached_tokens: int | None = None  # prompt tokens served by the cache at admission
        # Samples 1..n-1 of a request wait on sample 0 (their prompt_source) until its
        # prompt's full blocks are computed, then share them instead of computing them.
        self.prompt_source: Sequence | None = None
        self.forks: list[Sequence] = []  # the samples waiting on this one's prompt
        self.generator = generator  # per-request RNG when a seed is given
        self.detokenizer = detokenizer  # the generated text, decoded after the prompt's
        # The grammar's state for a request with structured_outputs (set by the engine).
        self.structured: StructuredMatcher | None = None
        self.stop_string_text: str | None = None  # the output text when a stop string hit
        # One entry per sampled token (the last may be an EOS that is not output); None
        # when not asked for.
        self.logprobs: SampleLogprobs | None = None if params.logprobs is None else []
        # None for the first prompt token, then one entry per scored prompt token.
        self.prompt_logprobs: PromptLogprobs | None = (
            None if params.prompt_logprobs is None else [None]
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Everything but the last sampled token is cached: one new token per step."""
        return self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs are asked for and some prompt tokens are not scored yet."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < self.num_prompt_tokens

    def completion_output(self, reason: FinishReason) -> CompletionOutput:
        """What this sequence produced, for its request's output."""
        text = self.stop_string_text
        if text is None:
            self.detokenizer.flush()
            text = self.detokenizer.text
        token_ids = self.output_token_ids
        logprobs, cumulative = self.logprobs, None
        if logprobs is not None:
            logprobs = logprobs[: len(token_ids)]  # less a final EOS / stop token id's
            cumulative = sum(
                (entry[t].logprob for t, entry in zip(token_ids, logprobs, strict=True)), 0.0
            )
        return CompletionOutput(self.sample_index, text, token_ids, cumulative, logprobs, reason)
