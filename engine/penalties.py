"""Repetition, frequency and presence penalties on a step's logits, as vLLM applies them.

For the rows whose requests set any (other rows, and steps where none does, cost
nothing), in one batched pass:
- repetition_penalty (Hugging Face's / CTRL's): the logit of every token that occurs in
  the prompt or the output so far is divided by it where positive, multiplied where not;
- frequency_penalty and presence_penalty (OpenAI's): subtracted from the logits of the
  tokens generated so far, times their count and once, respectively.
They come before temperature and before any truncation, so they change greedy choices too.

Only the logits of tokens that occur change, so the work is over the (row, token) pairs
that occur, not over rows x vocabulary: a sequence holds far fewer distinct tokens than
the vocabulary has.
"""

from __future__ import annotations

import itertools

import torch

from engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [N, vocab] (row i is seqs[i]'s) with each row's penalties applied: a new
    tensor, or logits itself when no row has any."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.has_penalties]
    if not rows:
        return logits
    penalized = logits.clone()
    repeating = [i for i in rows if seqs[i].params.repetition_penalty != 1]
    if repeating:
        row, token, _ = _distinct_pairs(logits, repeating, [seqs[i].token_ids for i in repeating])
        penalty = _per_row(logits, seqs, "repetition_penalty")[row]
        values = logits[row, token]
        penalized[row, token] = torch.where(values > 0, values / penalty, values * penalty)
    outputs = [seqs[i].output_token_ids for i in rows]
    row, token, counts = _distinct_pairs(logits, rows, outputs)
    frequency = _per_row(logits, seqs, "frequency_penalty")[row]
    presence = _per_row(logits, seqs, "presence_penalty")[row]
    penalized[row, token] = penalized[row, token] - frequency * counts - presence
    return penalized


def _distinct_pairs(
    logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (row, token) pairs where token_ids[i] are logits row rows[i]'s tokens,
    and how often each occurs: index tensors and float counts on the logits' device."""
    device, vocab = logits.device, logits.shape[-1]
    lengths = torch.tensor([len(ids) for ids in token_ids])
    row = torch.repeat_interleave(torch.tensor(rows), lengths)
    token = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64)
    keys, counts = torch.unique((row * vocab + token).to(device), return_counts=True)
    return keys // vocab, keys % vocab, counts.to(logits.dtype)


def _per_row(logits: torch.Tensor, seqs: list[Sequence], name: str) -> torch.Tensor:
    return torch.tensor([getattr(seq.params, name) for seq in seqs], device=logits.device)
