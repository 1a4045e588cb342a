"""Deciding when a sequence is finished, and the text of its generated tokens."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine.outputs import FinishReason

if TYPE_CHECKING:
    from engine.sequence import Sequence


# Prompt tokens decoded as context before the first output token (as in vLLM): enough
# to carry the space before the first word and the first bytes of a character.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of the generated tokens, grown a token at a time, as it reads on from the prompt.

    Each new piece is decoded together with a few tokens before it (at first the prompt's
    last ones) and the text they already gave is subtracted: tokenizers that drop a
    leading space at the start of a decode (SentencePiece) or need several tokens for one
    character (byte-level BPE) then still give exactly what a full decode adds, so
    decode(prompt + output) == decode(prompt) + text. A piece ending in an incomplete
    character waits. Where the prompt itself ends inside a character, the output text
    starts with that character once the output completes it.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        prompt = prompt_token_ids or []
        self.token_ids = prompt[self._context_start(prompt) :]  # the prompt's last, then output
        self.text = ""
        self.prefix_offset = 0  # start of the context decoded with the new tokens
        self.read_offset = len(self.token_ids)  # tokens before this are in the prompt or text

    def append(self, token_id: int, read: bool = True) -> str:
        """Add one token; return the text it completes (possibly empty). read=False only
        records it, for flush() to decode with the rest: requests without stop strings
        need their text only at the end, and two decodes per token per step add up at
        hundreds of sequences."""
        self.token_ids.append(token_id)
        return self._read(final=False) if read else ""

    def flush(self) -> str:
        """Return the text of the tokens still waiting, incomplete characters as U+FFFD
        (as a full decode gives them): for the end of the output."""
        return self._read(final=True)

    def _read(self, final: bool) -> str:
        before = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.token_ids[self.prefix_offset :])
        if after.endswith("\ufffd") and not final:
            return ""
        # `before` ends in U+FFFD where the prompt ends inside a character, and `after`
        # has the completed character there instead.
        common = len(os.path.commonprefix([before, after]))
        new_text = after[common:]
        if not new_text:  # e.g. a skipped special token
            return ""
        self.text += new_text
        if common == len(before):  # else the read offset is inside that character
            self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text

    def _context_start(self, prompt: list[int]) -> int:
        """Where the prompt's context starts: its last few tokens, or more where those
        decode to nothing (special tokens: the first output token would again be at the
        start of a decode) or start inside a character (Hugging Face's ByteFallback
        decoder turns that whole run of byte tokens into U+FFFDs)."""
        width = PROMPT_CONTEXT_TOKENS
        start = max(len(prompt) - width, 0)
        while start > 0 and self._decode(prompt[start:])[:1] in ("", "\ufffd"):
            width *= 2
            start = max(len(prompt) - width, 0)
        return start

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def check_finished(
    seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_seq_len: int
) -> FinishReason | None:
    """Append a sampled token to seq unless it ends it; return the finish reason if done.

    EOS and stop token ids end the sequence without being added to its output. A stop
    string ends it after the token that completes it, and its text is cut before it.
    """
    params = seq.params
    if token_id in eos_token_ids and not params.ignore_eos:
        return FinishReason.STOP
    if params.stop_token_ids and token_id in params.stop_token_ids:
        return FinishReason.STOP
    seq.token_ids.append(token_id)
    new_text = seq.detokenizer.append(token_id, read=bool(params.stop))
    if new_text:
        seq.stop_string_text = _text_before_stop_string(seq.detokenizer.text, new_text, params.stop)
        if seq.stop_string_text is not None:
            return FinishReason.STOP
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_seq_len:
        return FinishReason.LENGTH
    return None


def _text_before_stop_string(text: str, new_text: str, stops: list[str]) -> str | None:
    """The text up to the first stop string, where the new text at its end completes one."""
    first_new = len(text) - len(new_text)
    # A match must end in the new text, but may start in the text before it.
    matches = [text.find(stop, max(0, first_new - len(stop) + 1)) for stop in stops]
    found = [index for index in matches if index != -1]
    return text[: min(found)] if found else None
