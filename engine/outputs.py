"""What the engine hands back for each finished request (vLLM's shapes and names)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a request ended (vLLM's values; results files store the text)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the context or KV pool is full
    ERROR = "error"  # the request could not run (RequestOutput.error says why)
    ABORTED = "aborted"  # abort_request()

    @property
    def completed(self) -> bool:
        """The model produced the output (as opposed to an error or an abort)."""
        return self in (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(slots=True)  # one per reported token and position: thousands per request
class Logprob:
    logprob: float  # natural log of the token's probability under the raw logits
    rank: int | None = None  # 1 = most likely; ties count as ahead (vLLM's `>=` count)
    decoded_token: str | None = None  # the token as text (engine.logprobs.TokenTexts)


# Per generated token, a dict of token id -> Logprob: the sampled token (always, with its
# true rank) and the top K. For the prompt, the same per token, None for the first.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One sample of a request (index 0 while requests take one sample)."""

    index: int
    # What the generated ids add to the prompt's text (prompt text + text reads right),
    # no special tokens, cut before a stop string.
    text: str
    token_ids: list[int]  # generated ids; a final EOS / stop token id is not included
    cumulative_logprob: float | None  # sum of logprobs' sampled-token values; None: off
    logprobs: SampleLogprobs | None  # one entry per token_ids entry; None: not asked for
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    """A finished request. text, token_ids, finish_reason and completion_tokens are
    outputs[0]'s, so code written for one sample per request reads on unchanged."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    error: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    prompt_logprobs: PromptLogprobs | None = None  # None: not asked for

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self.outputs[0].token_ids)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated for the request: every sample's (what usage counts)."""
        return sum(len(sample.token_ids) for sample in self.outputs)

    @classmethod
    def failed(cls, request_id: str, prompt_token_ids: list[int], error: str) -> RequestOutput:
        empty = CompletionOutput(0, "", [], None, None, FinishReason.ERROR)
        return cls(
            request_id=request_id, prompt_token_ids=prompt_token_ids, outputs=[empty],
            error=error, prompt_tokens=len(prompt_token_ids), cached_tokens=0,
        )
