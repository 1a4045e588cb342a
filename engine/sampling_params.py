"""Per-request decoding settings (the vLLM-style SamplingParams users already know).

Free of torch: jobs validate their sampling settings by building one at submit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs: top tokens reported per position
MAX_SAMPLES = 128  # n: OpenAI's limit on choices per request


@dataclass
class SamplingParams:
    max_tokens: int = 16
    # Samples of the prompt (RequestOutput.outputs); they share the prompt's KV blocks, and
    # with a seed sample i draws from a generator derived from (seed, i).
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    stop: list[str] | None = None  # text after (and including) a stop string is dropped
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Per generated token: the sampled token's log-probability and the `logprobs` most
    # likely tokens' (None: off). Raw log-softmax of the model's logits, before
    # penalties, temperature, min-p, top-k and top-p, as vLLM's default logprobs mode.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # OpenAI's definitions over the generated tokens: subtract presence_penalty from the
    # logit of every token generated so far, frequency_penalty times its count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face's (CTRL's): the logits of tokens in the prompt or the output are
    # divided by it where positive, multiplied where negative (1 = off).
    repetition_penalty: float = 1.0
    # Tokens less likely than min_p times the most likely one are dropped (after
    # temperature, before top-k and top-p, as vLLM); 0 = off.
    min_p: float = 0.0
    # The output always satisfies it: a JSON schema, a regex, a choice or a grammar.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if (isinstance(self.n, bool) or not isinstance(self.n, int)
                or not 1 <= self.n <= MAX_SAMPLES):
            raise ValueError(f"n must be an int in 1..{MAX_SAMPLES}, got {self.n!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError("stop_token_ids must be a list of non-negative ints")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
                or not 0 <= value <= MAX_LOGPROBS
            ):
                raise ValueError(
                    f"{name} must be None (off) or an int in 0..{MAX_LOGPROBS}, got {value!r}"
                )
        for name in ("presence_penalty", "frequency_penalty"):
            if not _number_in(getattr(self, name), -2.0, 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not _number_in(self.repetition_penalty, 0.0, math.inf) or self.repetition_penalty == 0:
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        if not _number_in(self.min_p, 0.0, 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )


def _number_in(value: object, low: float, high: float) -> bool:
    """A finite int or float (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high
