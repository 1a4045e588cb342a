"""What the engine hands back for each finished request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids; a final EOS / stop token id is not included
    # What the generated ids add to the prompt's text (prompt text + text reads right),
    # no special tokens, cut before a stop string.
    text: str
    finish_reason: str  # "stop" | "length" | "error" | "aborted"
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @classmethod
    def failed(cls, request_id: str, prompt_token_ids: list[int], error: str) -> RequestOutput:
        return cls(
            request_id=request_id, prompt_token_ids=prompt_token_ids, token_ids=[], text="",
            finish_reason="error", error=error, prompt_tokens=len(prompt_token_ids),
            completion_tokens=0, cached_tokens=0,
        )
