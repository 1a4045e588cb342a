"""Log-probabilities of sampled and prompt tokens, as vLLM reports them.

Raw values: the log-softmax of the model's logits, before penalties, temperature and any
truncation or mask (vLLM's default logprobs mode). Only the rows that ask are scored, on
the device, a slice of rows at a time; then one copy to the host, and the dicts vLLM
hands out.

A rank counts the tokens at least as likely as the scored one (vLLM's `>=` count), so
the most likely token has rank 1; the top K have ranks 1..K by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.outputs import Logprob

# Logits scored at a time (rows x vocabulary): temporaries of at most 16 MiB, not of a
# whole prompt chunk of thousands of rows. Below glibc's 32 MiB mmap ceiling they are also
# served from the heap, where larger ones would page-fault afresh every step on CPUs.
ELEMENTS_PER_PASS = 1 << 22
TOP_K_CHUNK = 64  # entries per chunk of top_k's first stage

TokenText = Mapping[int, str]  # a token id's Logprob.decoded_token (TokenTexts)


# SentencePiece's word marker: a lone token that starts a word decodes without its space.
WORD_MARKER = "\u2581"


class TokenTexts(dict[int, str]):
    """Token id -> the token as text, as vLLM's Logprob.decoded_token: the token decoded
    on its own, with the leading space its SentencePiece marker stands for (" the", not
    "the" or "\u2581the"); "" past the tokenizer's vocabulary. A byte of a multi-byte
    character decodes to U+FFFD. Looked up once per id: a step reports a few tokens for
    each of hundreds of sequences."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self._tokenizer = tokenizer

    def __missing__(self, token_id: int) -> str:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        text = "" if piece is None else self._tokenizer.decode([token_id])
        if piece is not None and piece.startswith(WORD_MARKER) and not text.startswith(" "):
            text = " " + text
        self[token_id] = text
        return text


def top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(k, dim=-1), in two stages: the k largest of each row lie in the chunks
    (of TOP_K_CHUNK) with the k largest chunk maxima, so one fast pass takes the maxima and
    topk runs over those chunks only (4-6x faster than topk over a whole vocabulary)."""
    rows, width = values.shape
    chunks = width // TOP_K_CHUNK
    if chunks <= k:
        return values.topk(k, dim=-1)
    maxima = values[:, : chunks * TOP_K_CHUNK].view(rows, chunks, TOP_K_CHUNK).amax(dim=-1)
    best_chunks = maxima.topk(k, dim=-1).indices
    offsets = torch.arange(TOP_K_CHUNK, device=values.device)
    columns = (best_chunks[:, :, None] * TOP_K_CHUNK + offsets).view(rows, -1)
    if chunks * TOP_K_CHUNK < width:  # the vocabulary's last, partial chunk: always looked at
        tail = torch.arange(chunks * TOP_K_CHUNK, width, device=values.device)
        columns = torch.cat([columns, tail.expand(rows, -1)], dim=1)
    top_values, picked = values.gather(1, columns).topk(k, dim=-1)
    return top_values, columns.gather(1, picked)


def logprob_dicts(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int], token_text: TokenText
) -> list[dict[int, Logprob]]:
    """Per row of raw logits [R, vocab]: {token id: Logprob} for token_ids[row] ([R], on
    the logits' device) and the row's num_top[row] most likely tokens (vLLM's order: the
    scored token first).

    A rank comes from the top list where it can (the token ranks above the list's last
    entry, which a sampled token nearly always does); only the other rows count their
    vocabulary, the slowest of the passes over it."""
    widest = max(num_top)
    rows_per_pass = max(1, ELEMENTS_PER_PASS // logits.shape[-1])
    values, ints = [], []
    for start in range(0, len(num_top), rows_per_pass):
        # log_softmax, not logits less a logsumexp: one fused pass (logsumexp is several
        # times slower on CPUs), and ranks compare the very values reported.
        logprobs = logits[start : start + rows_per_pass].log_softmax(dim=-1)
        targets = token_ids[start : start + rows_per_pass, None]
        target_logprobs = logprobs.gather(1, targets)
        # Two more than reported: a token up to one past the reported ranks above the last.
        top_logprobs, top_ids = top_k(logprobs, widest + 2)
        # An int32 sum: a bool tensor summed to int64 takes a slow path on CPUs (8x).
        ranks = (top_logprobs >= target_logprobs).sum(dim=-1, keepdim=True, dtype=torch.int32)
        beyond = (top_logprobs[:, -1] >= target_logprobs[:, 0]).nonzero().squeeze(1)
        if beyond.numel() > len(targets) // 4:  # many rows: one pass over them all
            ranks = (logprobs >= target_logprobs).sum(dim=-1, keepdim=True, dtype=torch.int32)
        elif beyond.numel():  # ranks lower than the list, or ties past its end: count them
            ranks[beyond] = (logprobs[beyond] >= target_logprobs[beyond]).sum(
                dim=-1, keepdim=True, dtype=torch.int32)
        values.append(torch.cat([target_logprobs, top_logprobs[:, :widest]], dim=1))
        ints.append(torch.cat([targets, ranks.to(torch.int64), top_ids[:, :widest]], dim=1))
    # One copy each to the host for the whole batch.
    value_rows = torch.cat(values).tolist()
    int_rows = torch.cat(ints).tolist()
    dicts = []
    for k, row_values, row_ints in zip(num_top, value_rows, int_rows, strict=True):
        token_id = row_ints[0]
        entry = {token_id: Logprob(row_values[0], row_ints[1], token_text[token_id])}
        # The scored token, if among the top, takes its place's rank (as in vLLM).
        for rank in range(1, k + 1):
            top_id = row_ints[rank + 1]
            entry[top_id] = Logprob(row_values[rank], rank, token_text[top_id])
        dicts.append(entry)
    return dicts
