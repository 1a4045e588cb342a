"""Paged attention in portable PyTorch (CPU and CUDA).

KV cache layout, per layer: K and V pools of shape [num_blocks, block_size, kv_heads,
head_dim]. Token position p of a sequence lives in block `block_table[p // block_size]`
at offset `p % block_size`, i.e. in slot `block * block_size + offset` of the flat pool.

Each step first writes the new tokens' K/V into their slots (one index_copy_), then
attends from the cache. Contexts are gathered whole blocks at a time, in block-table
order, so gathered position p is token position p: decode tokens (one query each) go
together in one call over their contexts padded to the longest, each prefill chunk in
its own call. A fused paged kernel can replace `PagedAttention` later and keep the
block tables, slot mapping and positions as its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Keyed by sliding window (None = full attention): a model mixes at most two kinds.
MaskByWindow = dict[int | None, torch.Tensor | None]


@dataclass
class DecodeBatch:
    """The single-query sequences of a step, attended to together."""

    rows: torch.Tensor  # [B] row of each decode token in the flat batch
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    masks: MaskByWindow  # [B, 1, 1, max_blocks * block_size] bool, True = attend


@dataclass
class PrefillChunk:
    """A run of consecutive prompt tokens of one sequence (possibly after cached ones)."""

    start: int  # rows [start, end) of the flat batch
    end: int
    context_len: int  # tokens in the cache once the chunk is written, the chunk included
    block_table: torch.Tensor  # [blocks covering context_len]
    masks: MaskByWindow  # [chunk_len, context_len] bool, or None for plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]


def build_attention_metadata(
    positions: torch.Tensor,
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    windows: set[int | None],
    device: torch.device,
) -> AttentionMetadata:
    """Describe a step's flat batch (CPU tensors in, device tensors out).

    Sequence i contributes query_lens[i] consecutive rows at the given positions, which
    are the last positions of its context (cached or earlier tokens come before them).
    """
    num_seqs = len(query_lens)
    max_blocks = max(len(table) for table in block_tables)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int64)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    blocks = tables[seq_of_row, positions // block_size]
    slot_mapping = blocks * block_size + positions % block_size

    row_starts = torch.cumsum(q_lens, 0) - q_lens
    context_lens = positions[row_starts + q_lens - 1] + 1
    is_decode = q_lens == 1
    decode = None
    if bool(is_decode.any()):
        decode_seqs = torch.nonzero(is_decode).flatten()
        decode = _decode_batch(
            row_starts[decode_seqs], context_lens[decode_seqs], tables[decode_seqs],
            block_size, windows, device,
        )
    prefills = [
        _prefill_chunk(
            int(row_starts[i]), query_lens[i], int(context_lens[i]),
            tables[i, : len(block_tables[i])], windows, device,
        )
        for i in range(num_seqs)
        if query_lens[i] != 1
    ]
    return AttentionMetadata(slot_mapping.to(device), decode, prefills)


def _decode_batch(
    rows: torch.Tensor,
    context_lens: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    windows: set[int | None],
    device: torch.device,
) -> DecodeBatch:
    # Trim table padding that no decode sequence reaches.
    num_blocks = -(-int(context_lens.max()) // block_size)
    tables = tables[:, :num_blocks]
    # Padded positions read block 0: harmless, the mask excludes them and the pool is
    # zero-initialised, so they are finite.
    key_positions = torch.arange(num_blocks * block_size)[None, :]
    query_positions = (context_lens - 1)[:, None]
    masks: MaskByWindow = {
        window: _allowed(query_positions, key_positions, window)[:, None, None, :].to(device)
        for window in windows
    }
    return DecodeBatch(rows.to(device), tables.to(device), masks)


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
    return PrefillChunk(start, start + query_len, context_len, table.to(device), masks)


def _allowed(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Causal mask (optionally limited to a sliding window), True = may attend."""
    allowed = key_positions <= query_positions
    if window is not None:
        allowed &= key_positions > query_positions - window
    return allowed


class PagedAttention(nn.Module):
    """Attention of one layer over its paged KV cache (bound by the model runner)."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache is not allocated")
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, meta.slot_mapping, k
        )
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, meta.slot_mapping, v
        )

        out = torch.empty_like(q)
        if meta.decode is not None:
            batch = meta.decode
            attended = self._attend(
                q.index_select(0, batch.rows).unsqueeze(2),  # [B, heads, 1, head_dim]
                _gather_blocks(self.k_cache, batch.block_tables),
                _gather_blocks(self.v_cache, batch.block_tables),
                batch.masks[self.sliding_window],
            )
            out.index_copy_(0, batch.rows, attended.squeeze(2))
        for chunk in meta.prefills:
            tables = chunk.block_table[None]
            attended = self._attend(
                q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0),
                _gather_blocks(self.k_cache, tables)[:, :, : chunk.context_len],
                _gather_blocks(self.v_cache, tables)[:, :, : chunk.context_len],
                chunk.masks[self.sliding_window],
            )
            out[chunk.start : chunk.end] = attended[0].transpose(0, 1)
        return out

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )


def _gather_blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks of each row of tables [B, n], concatenated: [B, kv_heads, n * block_size,
    head_dim]. Whole blocks at once: one index per block_size tokens."""
    batch, num_blocks = tables.shape
    _, block_size, kv_heads, head_dim = pool.shape
    gathered = pool.index_select(0, tables.flatten())
    return gathered.view(batch, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)
