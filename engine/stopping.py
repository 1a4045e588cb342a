"""Deciding when a sequence is finished, and the text of requests with stop strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.sequence import Sequence


class IncrementalDetokenizer:
    """Text of the generated tokens, grown a token at a time.

    Each new piece is decoded together with a few tokens before it and the text they
    already gave is subtracted: tokenizers that drop a leading space at the start of a
    decode (SentencePiece) or need several tokens for one character (byte-level BPE) then
    still give exactly the full text. A piece ending in an incomplete character waits.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # start of the context decoded with the new tokens
        self.read_offset = 0  # tokens before this are already in text

    def append(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        before = self._decode(self.prefix_offset, self.read_offset)
        after = self._decode(self.prefix_offset, len(self.token_ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new_text = after[len(before) :]
        self.text += new_text
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)


def check_finished(
    seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_seq_len: int
) -> str | None:
    """Append a sampled token to seq unless it ends it; return the finish reason if done.

    EOS and stop token ids end the sequence without being added to its output. A stop
    string ends it after the token that completes it, and its text is cut before it.
    """
    params = seq.params
    if token_id in eos_token_ids and not params.ignore_eos:
        return "stop"
    if params.stop_token_ids and token_id in params.stop_token_ids:
        return "stop"
    seq.token_ids.append(token_id)
    if seq.detokenizer is not None:
        seq.stop_string_text = _text_before_stop_string(seq.detokenizer, token_id, params.stop)
        if seq.stop_string_text is not None:
            return "stop"
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_seq_len:
        return "length"
    return None


def _text_before_stop_string(
    detokenizer: IncrementalDetokenizer, token_id: int, stops: list[str]
) -> str | None:
    """The text up to the first stop string, once the new token completes one."""
    new_text = detokenizer.append(token_id)
    if not new_text:
        return None
    text = detokenizer.text
    first_new = len(text) - len(new_text)
    # A match must end in the new text, but may start in the text before it.
    matches = [text.find(stop, max(0, first_new - len(stop) + 1)) for stop in stops]
    found = [index for index in matches if index != -1]
    return text[: min(found)] if found else None
