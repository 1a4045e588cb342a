"""Token bitmasks (one bit per vocabulary entry, 32 to an int32 word, bit t % 32 of word
t // 32 for token t: the layout xgrammar and llguidance share) and their application to
a step's logits.

Applying adds a 0 / -inf bias to the constrained rows only. Why not a library kernel:
llguidance's is a torch.compile function (a C++ or Triton build at first use, again per
new shape), and xgrammar's CPU kernel is slower than this (scripts/grammar_backends.py).
On CPUs numpy unpacks the bits and adds the bias in place a few rows at a time (one
[rows, vocab] bias would be tens of MB written once and read once; torch's masked_fill_
and add_ are slower there); on GPUs torch shifts and adds, all on the device.
"""

from __future__ import annotations

import numpy as np
import torch

_NEG_INF_OR_ZERO = np.array([-np.inf, 0.0], dtype=np.float32)  # indexed by the bit


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row."""
    return -(-vocab_size // 32)


def allocate_token_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 [num_rows, words] bitmask, all allowed; in pinned memory where CUDA
    is present, so that copying it to the GPU each step does not wait for the copy."""
    return torch.full(
        (num_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32,
        pin_memory=torch.cuda.is_available(),
    )


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] is 0.

    logits: [N, vocab] on any device; bitmask: CPU int32 [len(rows), words], words*32 >=
    vocab (ids past vocab are ignored); rows: the constrained rows, distinct. The other
    rows are not read or written.
    """
    if not rows:
        return
    vocab = logits.shape[-1]
    if bitmask.dim() != 2 or bitmask.shape[0] != len(rows) or bitmask.shape[1] * 32 < vocab:
        raise ValueError(
            f"bitmask {tuple(bitmask.shape)} must have one row per constrained row "
            f"({len(rows)}) and at least {bitmask_width(vocab)} words for {vocab} logits"
        )
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        _apply_numpy(logits.detach().numpy(), bitmask, rows)
        return
    bias = _bias_on_device(bitmask.to(logits.device, non_blocking=True), vocab)
    logits.index_add_(0, torch.tensor(rows, device=logits.device), bias.to(logits.dtype))


_ROWS_PER_CHUNK = 8


def _apply_numpy(logits: np.ndarray, bitmask: torch.Tensor, rows: list[int]) -> None:
    vocab = logits.shape[-1]
    # The int32 words as little-endian bytes: numpy's little bit order is then token order.
    words = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK]
        bits = np.unpackbits(
            words[start : start + len(chunk)], axis=-1, count=vocab, bitorder="little"
        )
        consecutive = chunk == list(range(chunk[0], chunk[0] + len(chunk)))
        target = slice(chunk[0], chunk[0] + len(chunk)) if consecutive else chunk
        logits[target] += np.take(_NEG_INF_OR_ZERO, bits)


def _bias_on_device(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 on the bitmask's device: 0 where allowed, -inf where not."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    allowed = bits.view(bitmask.shape[0], -1)[:, :vocab].bool()
    return torch.where(allowed, 0.0, float("-inf"))
