"""Paged attention in portable PyTorch (CPU and CUDA).

KV cache layout, per layer: K and V pools of shape [num_blocks, kv_heads, block_size,
head_dim]. Token position p of a sequence lives in block `block_table[p // block_size]`
at offset `p % block_size`. A block is one contiguous run of memory, so a batch of blocks
gathered by id is a batch of [block_size, head_dim] matrices per KV head.

Each step first writes the new tokens' K/V into their slots, then attends from the cache.

Decode tokens (one query each) are attended to together, without padding every context to
the longest: the step lists the (sequence, block) pairs that decode tokens read (only the
blocks inside a sliding window), gathers exactly those blocks into a reused buffer, and
computes scores and weighted values per pair with batched matmuls (grouped-query heads
share their KV head's block: no widening). The softmax runs over each sequence's pairs
(segment max and sum with scatter/index_add). This beats gathering the contexts padded to
the longest and calling scaled_dot_product_attention, whose CPU kernel is slow for one
query row and strided K/V; and fresh allocations of the gathered KV (page faults on every
step) would cost more than the copy itself, hence the reused buffer.

Where a kernel exists (engine/kernels: C on CPUs, Triton on CUDA), decode tokens go to it
instead: it reads each sequence's blocks in place from the pool with an online softmax in
float32, moving only the KV bytes themselves, which is faster again than the gather above.
The portable path stays for machines without a C compiler or Triton.

Prefill chunks (several queries of one sequence) go to scaled_dot_product_attention, one
call per chunk: over the chunk's own K/V when nothing is cached before it (no gather),
else over its gathered context. A fused paged kernel can replace `PagedAttention` later
and keep the block tables, slot mapping and positions as its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels

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


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    pairs: DecodePairs,
    scale: float,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """One query per sequence against its paged context.

    q: [B, heads, head_dim]; pools: [num_blocks, kv_heads, block_size, head_dim].
    Returns [B, heads, head_dim] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    num_pairs = pairs.block_ids.shape[0]
    kv_heads = k_pool.shape[1]
    group = num_heads // kv_heads
    if workspace is None:
        workspace = Workspace()
    keys, values = workspace.buffers(k_pool, num_pairs)
    torch.index_select(k_pool, 0, pairs.block_ids, out=keys)
    torch.index_select(v_pool, 0, pairs.block_ids, out=values)
    # Query heads h*group .. h*group+group-1 share KV head h (as repeat_kv).
    q_pairs = q.view(batch, kv_heads, group, head_dim).index_select(0, pairs.seq_index)
    scores = torch.matmul(q_pairs, keys.transpose(-1, -2)).float()  # [P, kv, group, bs]
    scores.mul_(scale).add_(pairs.bias)
    # Softmax over each sequence's pairs: subtract the sequence's max, normalise by its sum.
    block_max = scores.amax(-1)
    seq_max = torch.full(
        (batch, kv_heads, group), float("-inf"), dtype=torch.float32, device=q.device
    ).scatter_reduce_(0, pairs.seq_index[:, None, None].expand_as(block_max), block_max, "amax")
    weights = scores.sub_(seq_max.index_select(0, pairs.seq_index)[..., None]).exp_()
    # index_add_ over 2-D rows: on CPU the N-D form falls back to a slow scatter.
    denom = torch.zeros(batch, num_heads, 1, dtype=torch.float32, device=q.device)
    denom.view(batch, num_heads).index_add_(
        0, pairs.seq_index, weights.sum(-1).view(num_pairs, num_heads)
    )
    partial = torch.matmul(weights.to(q.dtype), values)  # [P, kv, group, head_dim]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    out.view(batch, -1).index_add_(
        0, pairs.seq_index, partial.view(num_pairs, -1).to(torch.float32)
    )
    return out.div_(denom).to(q.dtype)


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
        self.k_cache: torch.Tensor | None = None  # [num_blocks, kv_heads, block_size, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache is not allocated")
        # Pool[block, :, offset] = new K/V (the advanced indices' dim comes first: [T, kv, d]).
        self.k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
        self.v_cache[meta.slot_blocks, :, meta.slot_offsets] = v

        out = torch.empty_like(q)
        if meta.decode is not None:
            batch = meta.decode
            queries = q.index_select(0, batch.rows)
            if batch.pairs is None:
                attended = kernels.paged_decode(
                    queries, self.k_cache, self.v_cache, batch.block_tables,
                    batch.context_lens, self.scale, self.sliding_window,
                )
            else:
                attended = paged_decode_attention(
                    queries, self.k_cache, self.v_cache,
                    batch.pairs[self.sliding_window], self.scale, meta.workspace,
                )
            out.index_copy_(0, batch.rows, attended)
        for chunk in meta.prefills:
            if chunk.block_table is None:
                keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
                values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            else:
                keys = self._context(self.k_cache, chunk)
                values = self._context(self.v_cache, chunk)
            attended = self._attend(
                q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0), keys, values,
                chunk.masks[self.sliding_window],
            )
            out[chunk.start : chunk.end] = attended[0].transpose(0, 1)
        return out

    def _context(self, pool: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        """The chunk's whole context from the pool: [1, kv_heads, context_len, head_dim]."""
        assert chunk.block_table is not None
        blocks = pool.index_select(0, chunk.block_table)  # [n, kv_heads, block_size, d]
        context = blocks.transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)
        return context[None, :, : chunk.context_len]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
