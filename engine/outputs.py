"""What the engine hands back for each finished request."""

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


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids; a final EOS / stop token id is not included
    # What the generated ids add to the prompt's text (prompt text + text reads right),
    # no special tokens, cut before a stop string.
    text: str
    finish_reason: FinishReason
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @classmethod
    def failed(cls, request_id: str, prompt_token_ids: list[int], error: str) -> RequestOutput:
        return cls(
            request_id=request_id, prompt_token_ids=prompt_token_ids, token_ids=[], text="",
            finish_reason=FinishReason.ERROR, error=error, prompt_tokens=len(prompt_token_ids),
            completion_tokens=0, cached_tokens=0,
        )
