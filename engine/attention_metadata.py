"""Attention metadata: what one step's flat batch means to every attention layer.

Built once per step on CPU (device tensors out) and shared by all layers. Sequence i
contributes query_lens[i] consecutive rows, the last positions of its context. The
metadata gives each new token's K/V slot (block and offset in the paged cache, layout in
engine/attention.py) and how the rows attend:

- decode tokens (one query each): block tables and context lengths, plus, for the
  portable path, the (sequence, block) pairs they read (only the blocks inside a
  sliding window) with a 0 / -inf bias per key, one set per kind of layer;
- prefill chunks (several queries of one sequence): their rows, their context length,
  the block table to gather the context from (None when nothing is cached before the
  chunk: it attends to its own K/V) and a mask per sliding window (None: plain causal);
- the Workspace, gather buffers reused across layers and steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Keyed by sliding window (None = full attention): a model mixes at most two kinds.
MaskByWindow = dict[int | None, torch.Tensor | None]


class Workspace:
    """Gather buffers reused across layers and steps (the layers run one after another).

    Sized to the largest gather seen so far, with headroom, so steady state allocates
    nothing: a fresh multi-MiB tensor per layer costs page faults on every step on CPU.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def buffers(self, pool: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [num_blocks, *pool.shape[1:]] buffers like pool (dtype, device)."""
        block_shape = pool.shape[1:]
        k = self._k
        if (
            k is None
            or k.shape[0] < num_blocks
            or k.shape[1:] != block_shape
            or k.dtype != pool.dtype
            or k.device != pool.device
        ):
            size = max(num_blocks + num_blocks // 4, 16)
            self._k = torch.empty(size, *block_shape, dtype=pool.dtype, device=pool.device)
            self._v = torch.empty_like(self._k)
        assert self._k is not None and self._v is not None
        return self._k[:num_blocks], self._v[:num_blocks]


@dataclass
class DecodePairs:
    """The (decode sequence, cache block) pairs that one kind of layer reads."""

    block_ids: torch.Tensor  # [P] pool block of each pair
    seq_index: torch.Tensor  # [P] which decode sequence (0..B-1) the pair belongs to
    bias: torch.Tensor  # [P, 1, 1, block_size] float32: 0 = attend, -inf = masked


@dataclass
class DecodeBatch:
    """The single-query sequences of a step, attended to together."""

    rows: torch.Tensor  # [B] row of each decode token in the flat batch
    block_tables: torch.Tensor  # [B, width] int64, padded with block 0
    context_lens: torch.Tensor  # [B] int64, the query included
    pairs: dict[int | None, DecodePairs] | None  # by sliding window; None: engine.kernels


@dataclass
class PrefillChunk:
    """A run of consecutive prompt tokens of one sequence (possibly after cached ones)."""

    start: int  # rows [start, end) of the flat batch
    end: int
    context_len: int  # tokens in the cache once the chunk is written, the chunk included
    block_table: torch.Tensor | None  # [blocks covering context_len]; None: no cached prefix
    masks: MaskByWindow  # [chunk_len, context_len] bool, or None for plain causal


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block where each new token's K/V goes
    slot_offsets: torch.Tensor  # [T] and its offset in the block
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    workspace: Workspace


def padded_block_tables(block_tables: list[list[int]]) -> torch.Tensor:
    """[num_seqs, longest] int64, padded with block 0, built without a per-row tensor."""
    lengths = torch.tensor([len(table) for table in block_tables], dtype=torch.int64)
    width = int(lengths.max()) if len(block_tables) else 0
    tables = torch.zeros(len(block_tables), width, dtype=torch.int64)
    flat = [block for table in block_tables for block in table]
    tables[torch.arange(width)[None, :] < lengths[:, None]] = torch.tensor(flat, dtype=torch.int64)
    return tables


def build_attention_metadata(
    positions: torch.Tensor,
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    windows: set[int | None],
    device: torch.device,
    workspace: Workspace | None = None,
    decode_kernel: bool = False,
) -> AttentionMetadata:
    """Describe a step's flat batch (CPU tensors in, device tensors out).

    Sequence i contributes query_lens[i] consecutive rows at the given positions, which
    are the last positions of its context (cached or earlier tokens come before them).
    decode_kernel: decode tokens go to engine.kernels.paged_decode, which needs no pairs.
    """
    num_seqs = len(query_lens)
    tables = padded_block_tables(block_tables)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    slot_blocks = tables[seq_of_row, positions // block_size]
    slot_offsets = positions % block_size

    row_starts = torch.cumsum(q_lens, 0) - q_lens
    context_lens = positions[row_starts + q_lens - 1] + 1
    is_decode = q_lens == 1
    decode = None
    if bool(is_decode.any()):
        decode_seqs = torch.nonzero(is_decode).flatten()
        decode = _decode_batch(
            row_starts[decode_seqs], context_lens[decode_seqs], tables[decode_seqs],
            block_size, None if decode_kernel else windows, device,
        )
    prefills = [
        _prefill_chunk(
            int(row_starts[i]), query_lens[i], int(context_lens[i]),
            tables[i, : len(block_tables[i])], windows, device,
        )
        for i in range(num_seqs)
        if query_lens[i] != 1
    ]
    return AttentionMetadata(
        slot_blocks.to(device), slot_offsets.to(device), decode, prefills,
        workspace if workspace is not None else Workspace(),
    )


def _decode_batch(
    rows: torch.Tensor,
    context_lens: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    windows: set[int | None] | None,
    device: torch.device,
) -> DecodeBatch:
    pairs = None
    if windows is not None:
        pairs = {
            window: _decode_pairs(context_lens, tables, block_size, window, device)
            for window in windows
        }
    return DecodeBatch(rows.to(device), tables.to(device), context_lens.to(device), pairs)


def _decode_pairs(
    context_lens: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    window: int | None,
    device: torch.device,
) -> DecodePairs:
    """The blocks each decode token reads: those holding keys it may attend to."""
    query_positions = context_lens - 1
    first_key = torch.zeros_like(context_lens)
    if window is not None:
        first_key = (query_positions - window + 1).clamp(min=0)
    first_block = first_key // block_size
    num_blocks = query_positions // block_size - first_block + 1
    seq_index = torch.repeat_interleave(torch.arange(len(context_lens)), num_blocks)
    pair_starts = torch.cumsum(num_blocks, 0) - num_blocks
    block_index = first_block[seq_index] + torch.arange(len(seq_index)) - pair_starts[seq_index]
    block_ids = tables[seq_index, block_index]
    key_positions = block_index[:, None] * block_size + torch.arange(block_size)[None, :]
    # Every pair has at least one key to attend to, so no softmax row is all -inf.
    allowed = _allowed(query_positions[seq_index][:, None], key_positions, window)
    bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
    return DecodePairs(
        block_ids.to(device), seq_index.to(device), bias[:, None, None, :].to(device)
    )


def _prefill_chunk(
    start: int,
    query_len: int,
    context_len: int,
    table: torch.Tensor,
    windows: set[int | None],
    device: torch.device,
) -> PrefillChunk:
    key_positions = torch.arange(context_len)[None, :]
    query_positions = torch.arange(context_len - query_len, context_len)[:, None]
    masks: MaskByWindow = {}
    for window in windows:
        if window is None and query_len == context_len:
            masks[window] = None  # nothing cached before the chunk: plain causal attention
        else:
            masks[window] = _allowed(query_positions, key_positions, window).to(device)
    # Nothing cached before the chunk: it attends to its own K/V, no gather needed.
    block_table = None if query_len == context_len else table.to(device)
    return PrefillChunk(start, start + query_len, context_len, block_table, masks)


def _allowed(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Causal mask (optionally limited to a sliding window), True = may attend."""
    allowed = key_positions <= query_positions
    if window is not None:
        allowed &= key_positions > query_positions - window
    return allowed
